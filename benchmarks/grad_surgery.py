"""Cost of gradient surgery: a training step with PCGrad / Aligned-MTL in each of its modes vs the summed step, and
the aggregation maths alone vs a plain sum of the task gradients.

1. Step: a small ViT (the quick start's backbone) with T classification heads, forward + aggregator backward, for
   T = 2, 4, 6, in two settings:
   * ``disjoint``: each task on its own batch, as in the trainer (heterogeneous data): the per-task backward passes
     together cost one summed backward;
   * ``shared``: one batch, one backbone forward, T heads on it (one dataset labelled for every task): T backward
     passes through the backbone, the floor of parameter-level surgery.
   Methods: the weighted sum; PCGrad and Aligned-MTL at the parameter level, materialised (per-task gradients by a
   loop of ``autograd.grad``, or ``batched`` in one vmapped call) or in Gram mode (``gram_chunks = T``: G held one
   parameter group at a time, then one weighted backward); Aligned-MTL-UB (feature level). ``G MB`` is the largest
   set of per-task gradients handed to the Gram matrix at once (measured): the surgery's extra memory.
2. Aggregation alone at P parameters (default 22M, a ViT-S): given T gradient rows, the float64 Gram matrix + the
   weights + ``w^T G`` (the surgery's extra work) vs summing the T rows.

Runs alternate between methods; each time is the median of ``--repeats`` runs of ``--steps`` steps. Prints the ratios
to the summed step last.

    python benchmarks/grad_surgery.py [--tasks 2 4 6] [--batch-size 16] [--params 22000000] [--steps 5] [--repeats 3]
"""
import argparse

import torch

import mtvision.optim.aggregators as aggregators
from common import alternate_timings
from mtvision.models.multitask import MultiTaskModel
from mtvision.optim import AlignedMTL, AlignedMTLUB, PCGrad, WeightedSum
from mtvision.optim.gradient_surgery import aligned_mtl_weights, combine, gram_from_gradients, pcgrad_weights

BACKBONE = dict(type='ViT', model_name='vit_tiny_patch16_224', img_size=64, patch_size=8, embed_dim=128, depth=6,
                num_heads=4)


class HeldGradients:
    """Records the largest total size of the per-task gradients passed to one Gram-matrix call."""

    def __init__(self):
        self.peak_bytes = 0
        self._gram = aggregators.gram_from_gradients

    def __call__(self, grads):
        self.peak_bytes = max(self.peak_bytes, sum(g.numel() * g.element_size() for g in grads))
        return self._gram(grads)


def step_fn(model: MultiTaskModel, aggregator, batches: dict, shared_images: bool):
    shared = list(model.shared_parameters())
    own = {task: list(model.task_parameters(task)) for task in batches}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with model.capturing_features() as features:
            if shared_images:  # one forward; every head reads the same output
                images = next(iter(batches.values()))['images']
                output = model.features(next(iter(batches)), images)
                losses = {task: model.heads[task].loss(model.heads[task](output), batch['targets'])['loss_cls']
                          for task, batch in batches.items()}
                features = {task: output for task in batches}
            else:
                losses = {task: model.loss(task, batch)['loss_cls'] for task, batch in batches.items()}
        aggregator.backward(losses, shared, own, features=features)
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

    held = HeldGradients()
    aggregators.gram_from_gradients = held
    print(f'{"setting":<8} {"T":>2} {"method":<24} {"ms/step":>9} {"vs sum":>7} {"G MB":>7}')
    step_ratios = {}
    for setting in ('disjoint', 'shared'):
        for num_tasks in args.tasks:
            torch.manual_seed(0)
            tasks = [f'task{i}' for i in range(num_tasks)]
            model = MultiTaskModel(BACKBONE, {t: dict(type='ClassificationHead', num_classes=6) for t in tasks})
            generator = torch.Generator().manual_seed(1)
            batches = {t: dict(images=torch.randn(args.batch_size, 3, 64, 64, generator=generator),
                               targets=torch.randint(0, 6, (args.batch_size,), generator=generator)) for t in tasks}
            weights = {t: 1.0 for t in tasks}
            methods = {'sum': WeightedSum(weights),
                       'PCGrad': PCGrad(weights),
                       'PCGrad batched': PCGrad(weights, per_task_grads='batched'),
                       f'PCGrad gram_chunks={num_tasks}': PCGrad(weights, gram_chunks=num_tasks),
                       'AlignedMTL': AlignedMTL(weights),
                       f'AlignedMTL gram_chunks={num_tasks}': AlignedMTL(weights, gram_chunks=num_tasks),
                       'AlignedMTLUB (feature)': AlignedMTLUB(weights)}
            held_bytes = {}
            for name, aggregator in methods.items():  # one untimed step each, to measure the gradients held
                held.peak_bytes = 0
                step_fn(model, aggregator, batches, setting == 'shared')()
                held_bytes[name] = held.peak_bytes
            steps = {name: step_fn(model, aggregator, batches, setting == 'shared')
                     for name, aggregator in methods.items()}
            medians, _ = alternate_timings(steps, args.steps, args.repeats, args.warmup)
            for name, value in medians.items():
                ratio = value / medians['sum']
                print(f'{setting:<8} {num_tasks:>2} {name:<24} {1000 * value:>9.1f} {ratio:>7.3f} '
                      f'{held_bytes[name] / 2 ** 20:>7.1f}')
                step_ratios[(setting, num_tasks, name.split(' gram')[0] + (' gram' if 'gram' in name else ''))] = ratio
    aggregators.gram_from_gradients = held._gram

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
    print(f'\nsummary at T = {t}, step time vs the summed step (disjoint / shared images): feature level '
          f'{step_ratios[("disjoint", t, "AlignedMTLUB (feature)")]:.2f} / '
          f'{step_ratios[("shared", t, "AlignedMTLUB (feature)")]:.2f} (goal <= 1.10); parameter level loop '
          f'{step_ratios[("disjoint", t, "AlignedMTL")]:.2f} / {step_ratios[("shared", t, "AlignedMTL")]:.2f}, '
          f'batched {step_ratios[("disjoint", t, "PCGrad batched")]:.2f} / '
          f'{step_ratios[("shared", t, "PCGrad batched")]:.2f} (goal <= 3.0), Gram mode '
          f'{step_ratios[("disjoint", t, "AlignedMTL gram")]:.2f} / {step_ratios[("shared", t, "AlignedMTL gram")]:.2f}'
          f'; aggregation maths vs a plain sum of the rows PCGrad {math_ratios[(t, "PCGrad")]:.2f}, AlignedMTL '
          f'{math_ratios[(t, "AlignedMTL")]:.2f} (goal <= 3); {torch.get_num_threads()} threads')

if __name__ == '__main__':
    main()
