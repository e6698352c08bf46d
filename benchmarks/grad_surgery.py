"""Cost of gradient surgery: a training step with PCGrad / Aligned-MTL vs the summed step, and the aggregation maths
alone vs a plain sum of the task gradients.

1. Step: a small ViT (the quick start's backbone) with T classification heads, each task on its own batch as in the
   trainer (heterogeneous data), forward + aggregator backward, for T = 2, 4, 6: WeightedSum, PCGrad, AlignedMTL.
2. Aggregation alone at P parameters (default 22M, a ViT-S): given T gradient rows, the float64 Gram matrix + the
   weights + ``w^T G`` (the surgery's extra work) vs summing the T rows.

Runs alternate between methods; each time is the median of ``--repeats`` runs of ``--steps`` steps. Prints the ratios
to the summed step last.

    python benchmarks/grad_surgery.py [--tasks 2 4 6] [--batch-size 16] [--params 22000000] [--steps 5] [--repeats 3]
"""
import argparse

import torch

from common import alternate_timings
from mtvision.models.multitask import MultiTaskModel
from mtvision.optim import AlignedMTL, PCGrad, WeightedSum
from mtvision.optim.gradient_surgery import aligned_mtl_weights, combine, gram_from_gradients, pcgrad_weights

BACKBONE = dict(type='ViT', model_name='vit_tiny_patch16_224', img_size=64, patch_size=8, embed_dim=128, depth=6,
                num_heads=4)


def step_fn(model: MultiTaskModel, aggregator, batches: dict):
    shared = list(model.shared_parameters())
    own = {task: list(model.task_parameters(task)) for task in batches}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        losses = {task: model.loss(task, batch)['loss_cls'] for task, batch in batches.items()}
        aggregator.backward(losses, shared, own)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tasks', type=int, nargs='+', default=[2, 4, 6])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--params', type=int, default=22_000_000, help='P for the aggregation-only timing')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()

    print(f'{"T":>2} {"method":<12} {"ms/step":>9} {"vs sum":>7}')
    step_ratios = {}
    for num_tasks in args.tasks:
        torch.manual_seed(0)
        tasks = [f'task{i}' for i in range(num_tasks)]
        model = MultiTaskModel(BACKBONE, {t: dict(type='ClassificationHead', num_classes=6) for t in tasks})
        generator = torch.Generator().manual_seed(1)
        batches = {t: dict(images=torch.randn(args.batch_size, 3, 64, 64, generator=generator),
                           targets=torch.randint(0, 6, (args.batch_size,), generator=generator)) for t in tasks}
        weights = {t: 1.0 for t in tasks}
        steps = {'sum': step_fn(model, WeightedSum(weights), batches),
                 'PCGrad': step_fn(model, PCGrad(weights), batches),
                 'AlignedMTL': step_fn(model, AlignedMTL(weights), batches)}
        medians, _ = alternate_timings(steps, args.steps, args.repeats, args.warmup)
        for name, value in medians.items():
            print(f'{num_tasks:>2} {name:<12} {1000 * value:>9.1f} {value / medians["sum"]:>7.3f}')
            step_ratios[(num_tasks, name)] = value / medians['sum']

    print(f'\naggregation alone, P = {args.params / 1e6:.0f}M parameters in 4 buckets')
    print(f'{"T":>2} {"method":<12} {"ms":>9} {"vs sum":>7}')
    math_ratios = {}
    for num_tasks in args.tasks:
        generator = torch.Generator().manual_seed(2)
        sizes = [args.params // 4] * 4
        buckets = [torch.randn(num_tasks, n, generator=generator) for n in sizes]
        runs = {
            'sum': lambda: [bucket.sum(dim=0) for bucket in buckets],
            'PCGrad': lambda: combine(pcgrad_weights(gram_from_gradients(buckets)), buckets),
            'AlignedMTL': lambda: combine(aligned_mtl_weights(gram_from_gradients(buckets)), buckets),
        }
        medians, _ = alternate_timings(runs, args.steps, args.repeats)
        for name, value in medians.items():
            print(f'{num_tasks:>2} {name:<12} {1000 * value:>9.1f} {value / medians["sum"]:>7.3f}')
            math_ratios[(num_tasks, name)] = value / medians['sum']

    t = 4 if 4 in args.tasks else args.tasks[0]
    print(f'\nsummary at T = {t}: step time vs the summed step PCGrad {step_ratios[(t, "PCGrad")]:.3f}, AlignedMTL '
          f'{step_ratios[(t, "AlignedMTL")]:.3f} (goal <= 3.0); aggregation maths vs a plain sum of the rows '
          f'PCGrad {math_ratios[(t, "PCGrad")]:.3f}, AlignedMTL {math_ratios[(t, "AlignedMTL")]:.3f} (goal <= 3); '
          f'{torch.get_num_threads()} threads')


if __name__ == '__main__':
    main()
