"""Training-step time of a task group (segmentation + depth + surface normals on the same images) with one shared
backbone forward vs one forward per task.

One step is what the trainer runs for the group: the forward, the three task losses and one backward of their sum
(``WeightedSum``), through the model of the grouped shared-image config
(``configs/shared/seg-depth-normals-group_tags_vit-tiny-p8_600it_synthetic.py``) with its backbone swapped for each
row's. ``one forward`` is :meth:`MultiTaskModel.group_losses` (the backbone once, every head on its output); ``three
forwards`` is :meth:`MultiTaskModel.loss` per task, what training the three tasks separately on the same images
costs. Runs alternate so drift in machine load hits both; each time is the median over ``--repeats`` rounds of the
mean of ``--steps`` steps. Rows: ViT-S/16 at 224 px (the backbone dominates the step; goal: one/three <= 0.45
there), the quick start's ViT (width 128, 6 blocks, patch 8) at 64 px, and the same with task-routed MoE layers
(8 experts, top-2, every other block), whose group runs one forward per task (the cost of routing per task). The
last line gives the ratio one/three of the first row.

    python benchmarks/shared_forward.py [--batch-size 8] [--steps 2] [--repeats 3] [--device cpu] [--rows MoE]
                                        [--quick]
"""
import argparse
import math

import torch

from common import ROOT, alternate_timings, synchronized
from mtvision.config import load_config
from mtvision.models import build_model
from mtvision.tasks import build_tasks

GROUPED = ROOT / 'configs' / 'shared' / 'seg-depth-normals-group_tags_vit-tiny-p8_600it_synthetic.py'
GROUP = ('seg', 'depth', 'normals')
BACKBONES = {  # row name -> (backbone overrides, image size)
    'ViT-S/16, 224 px': (dict(model_name='vit_small_patch16_224', img_size=224, patch_size=16, embed_dim=384, depth=12,
                              num_heads=6), 224),
    'quick start ViT, 64 px': ({}, 64),
    # task-routed experts: each task's tokens take its own experts, so a group runs one forward per task
    'quick start MoE ViT, 64 px': (dict(moe=dict(blocks='every_other', num_experts=8, top_k=2, router='per_task')), 64),
}
QUICK = {'tiny ViT (--quick), 64 px': (dict(embed_dim=32, depth=2, num_heads=2), 64)}


def group_model(backbone: dict, device: torch.device):
    cfg = load_config(str(GROUPED), {f'model.backbone.{key}': value for key, value in backbone.items()})
    tasks = build_tasks({name: cfg.tasks[name] for name in GROUP}, train=False, val=False)
    torch.manual_seed(0)
    return build_model(cfg, tasks).to(device).train()


def random_batch(batch_size: int, size: int, num_classes: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    normals = torch.randn(batch_size, 3, size, size, generator=generator)
    targets = dict(seg=torch.randint(0, num_classes, (batch_size, size, size), generator=generator),
                   depth=torch.rand(batch_size, 1, size, size, generator=generator) * 5 + 0.5,
                   normals=normals / normals.norm(dim=1, keepdim=True))
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    return dict(images=images.to(device), targets={name: value.to(device) for name, value in targets.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--steps', type=int, default=2, help='steps per timing')
    parser.add_argument('--repeats', type=int, default=3, help='timings per run (the median is reported)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--rows', nargs='+', help='only the rows whose name contains one of these, e.g. MoE')
    parser.add_argument('--quick', action='store_true', help='tiny smoke configuration (one step, small models)')
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.repeats = 2, 1, 1
    device = torch.device(args.device)
    rows = QUICK if args.quick else BACKBONES
    if args.rows:
        rows = {name: row for name, row in rows.items() if any(part in name for part in args.rows)}
    ratios = {}
    print(f'{"backbone":<24} {"one forward (s)":>16} {"three forwards (s)":>19} {"one / three":>12}')
    for row, (backbone, size) in rows.items():
        model = group_model(backbone, device)
        batch = random_batch(args.batch_size, size, model.heads['seg'].num_classes, device)

        def one_forward():
            model.zero_grad(set_to_none=True)
            losses = model.group_losses(GROUP, batch)
            sum(sum(terms.values()) for terms in losses.values()).backward()

        def three_forwards():
            model.zero_grad(set_to_none=True)
            total = sum(sum(model.loss(name, dict(images=batch['images'], targets=batch['targets'][name])).values())
                        for name in GROUP)
            total.backward()

        times, _ = alternate_timings({'one': synchronized(one_forward, device),
                                      'three': synchronized(three_forwards, device)},
                                     args.steps, args.repeats, warmup=1)
        ratios[row] = times['one'] / times['three']
        print(f'{row:<24} {times["one"]:>16.3f} {times["three"]:>19.3f} {ratios[row]:>12.3f}')
    first = next(iter(rows))
    assert math.isfinite(ratios[first])
    print(f'summary: batch {args.batch_size} on {device.type}; one shared forward / three forwards for {first}: '
          f'{ratios[first]:.3f}')


if __name__ == '__main__':
    main()
