"""Encoder step time with MAE masking vs the full image, same ViT.

One step is the encoder's forward and backward on a batch (the loss is the sum of its final tokens, so no decoder
time is counted): once with ``mask_ratio`` (only the visible patches go through the blocks) and once on every
patch. Runs alternate (full, masked, full, masked, ...) so drift in machine load hits both. The ideal ratio is
``1 - mask_ratio``; the patch embedding, the linear layers' fixed costs and attention (quadratic in the tokens,
so faster than ideal) move it.

    python benchmarks/mae.py [--steps 10] [--repeats 5] [--mask-ratio 0.75]
"""
import argparse
from collections.abc import Callable

import torch
from torch import Tensor

from mtvision.models.backbones.vit import ViT
from common import alternate_timings

# the quick-start ViT (width 128, depth 6, patch 8) at its 64 px and at 128 px, where the 256 tokens dominate
SETTINGS = ((64, 64), (128, 32))  # (image size, batch size)


def encoder_step(vit: ViT, images: Tensor, mask_ratio: float | None) -> Callable[[], None]:
    def step() -> None:
        vit.zero_grad(set_to_none=True)
        vit(images, mask_ratio=mask_ratio).tokens.sum().backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=10, help='timed steps per run')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--mask-ratio', type=float, default=0.75)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for image_size, batch_size in SETTINGS:
        vit = ViT('vit_tiny_patch16_224', img_size=image_size, patch_size=8, embed_dim=128, depth=6, num_heads=4)
        images = torch.randn(batch_size, 3, image_size, image_size)
        runs = {'full': encoder_step(vit, images, None), 'masked': encoder_step(vit, images, args.mask_ratio)}
        medians, times = alternate_timings(runs, args.steps, args.repeats, args.warmup)
        rows.append((f'{image_size}px b{batch_size} ({(image_size // 8) ** 2} patches)', medians, times))

    print(f'\n{"setting":<28} {"full ms/step":>13} {"masked ms/step":>15} {"masked/full":>12}')
    for name, medians, _ in rows:
        print(f'{name:<28} {1000 * medians["full"]:>13.1f} {1000 * medians["masked"]:>15.1f} '
              f'{medians["masked"] / medians["full"]:>12.3f}')
    for name, _, times in rows:
        print(f'runs {name}: ' + '; '.join(f'{run} ' + ' '.join(f'{1000 * v:.1f}' for v in values)
                                          for run, values in times.items()))
    name, medians, _ = rows[-1]
    print(f'\nsummary: masked/full encoder step time = {medians["masked"] / medians["full"]:.3f} '
          f'(ideal 1 - r = {1 - args.mask_ratio:.2f}) at {name}, {args.steps} steps x {args.repeats} runs, '
          f'{torch.get_num_threads()} threads')


if __name__ == '__main__':
    main()
