"""Probe costs: feature-extraction throughput, and the cached grid sweep vs the same heads trained one at a time.

The grid sweep (DINOv2 style) extracts features once, caches them, and trains every (feature, learning rate) head
together on the cached features. The naive way trains each head alone from images: every epoch is a forward pass
of the frozen backbone over the training images, then that head's update. Both train the same heads for the same
epochs on the quick-start backbone and the embedded classification data, in one run; the speed-up is printed last.

    python benchmarks/probe.py [--epochs 2] [--lrs 0.001 0.01 0.1] [--features cls avgpool] [--data data/synthetic]
"""
import argparse
import os
import time
from pathlib import Path

os.environ.setdefault('TQDM_DISABLE', '1')

import torch  # noqa: E402

from mtvision.config import load_config  # noqa: E402
from mtvision.data import ImageFolderDataset, ensure_synthetic  # noqa: E402
from mtvision.probe import eval_pipeline, extract_features  # noqa: E402
from mtvision.probe.linear import linear_sweep  # noqa: E402
from mtvision.registry import MODELS  # noqa: E402
from mtvision.tasks import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs' / 'quickstart' / 'vit-tiny-p8_4task_synthetic.py'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--lrs', type=float, nargs='+', default=[1e-3, 1e-2, 1e-1])
    parser.add_argument('--features', nargs='+', default=['cls', 'avgpool'])
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--data', default=str(ROOT / 'data' / 'synthetic'))
    args = parser.parse_args()
    ensure_synthetic(args.data)
    torch.manual_seed(0)
    backbone = MODELS.build(load_config(str(CONFIG)).model.backbone.to_dict()).eval()
    pipeline = eval_pipeline(backbone.model.patch_embed.img_size[0], IMAGENET_MEAN, IMAGENET_STD)
    root = Path(args.data) / 'classification'
    train_set = ImageFolderDataset(root / 'train', pipeline)
    val_set = ImageFolderDataset(root / 'val', pipeline, classes=train_set.classes)
    sweep_args = dict(epochs=args.epochs, batch_size=args.batch_size, val_fraction=0.0, progress=False, device='cpu')

    start = time.perf_counter()
    train = extract_features(backbone, train_set, progress=False)
    extract_seconds = time.perf_counter() - start
    val = extract_features(backbone, val_set, progress=False)
    start = time.perf_counter()
    grid = linear_sweep(train, val, len(train_set.classes), lrs=args.lrs, features=args.features, **sweep_args)
    sweep_seconds = time.perf_counter() - start

    start = time.perf_counter()
    naive_best = 0.0
    for feature in args.features:
        for lr in args.lrs:
            for _ in range(args.epochs):  # the forward pass over the images that each epoch of each head costs
                epoch_features = extract_features(backbone, train_set, progress=False)
            alone = linear_sweep(epoch_features, val, len(train_set.classes), lrs=[lr], features=[feature],
                                 **sweep_args)
            naive_best = max(naive_best, alone['best']['val']['top1'])
    naive_seconds = time.perf_counter() - start

    heads = len(args.features) * len(args.lrs)
    cached_total = extract_seconds + sweep_seconds
    print(f'\n{"what":<44} {"seconds":>9} {"images/s":>9}')
    print(f'{"feature extraction, train split (once)":<44} {extract_seconds:>9.2f} '
          f'{len(train_set) / extract_seconds:>9.0f}')
    print(f'{"grid sweep on cached features":<44} {sweep_seconds:>9.2f} {"":>9}')
    print(f'{"cached: extraction + sweep":<44} {cached_total:>9.2f} {"":>9}')
    print(f'{"one head at a time from images":<44} {naive_seconds:>9.2f} {"":>9}')
    print(f'\n{heads} heads ({" ".join(args.features)} x lr {" ".join(f"{lr:g}" for lr in args.lrs)}), '
          f'{args.epochs} epochs, {len(train_set)} train images; best val top-1: '
          f'sweep {grid["best"]["val"]["top1"]:.1f}, '
          f'one at a time {naive_best:.1f}')
    print(f'summary: extraction {len(train_set) / extract_seconds:.0f} images/s; cached sweep speed-up over one head '
          f'at a time = {naive_seconds / cached_total:.1f}x')


if __name__ == '__main__':
    main()
