"""Every aggregator on the synthetic shared-image layout (segmentation, depth and normals as one task group sharing
one backbone forward, multi-label classification beside it), several seeds each: each task's primary metric as
mean +- std over the seeds.

This is the setting of the published NYUv2 tables (LibMTL's, Aligned-MTL's): one image labelled for every task, so
the task gradients meet in one representation. Each run trains the grouped config
(``configs/shared/seg-depth-normals-group_tags_vit-tiny-p8_600it_synthetic.py``) for ``--iters`` iterations (its
warm-up and cosine schedule shortened to fit, :func:`mtvision.engine.extraction.shortened_schedule`) with one
aggregator and one seed (``randomness.seed``: initialisation, augmentation, sampling), then evaluates every task on
its validation set. Aggregators: the weighted sum, PCGrad and Aligned-MTL on the shared parameters' gradients,
Aligned-MTL-UB on the shared representation's gradients (the feature level), and uncertainty weighting.

    python benchmarks/aggregators_shared.py [--iters 300] [--seeds 0 1 2] [--aggregators sum pcgrad ...]
                                            [--threads N] [--work-dir DIR] [--quick]

Runs finished earlier in ``--work-dir`` (a ``metrics.json`` at ``--iters``) are read back, not trained again, so
several invocations with disjoint ``--aggregators`` can share the machine's cores (``--threads 1`` each) and a last
one prints the whole table. ``--quick`` trains 2 iterations of one seed on a tiny generated copy of the data (a
smoke test of the script).
"""
import argparse
import contextlib
import statistics
from pathlib import Path

from common import ROOT, enter_scratch_folder, train_recipe

GROUPED = ROOT / 'configs' / 'shared' / 'seg-depth-normals-group_tags_vit-tiny-p8_600it_synthetic.py'
AGGREGATORS = {'sum': dict(type='WeightedSum'), 'pcgrad': dict(type='PCGrad'), 'aligned-mtl': dict(type='AlignedMTL'),
               'aligned-mtl-ub': dict(type='AlignedMTLUB'), 'uncertainty': dict(type='UncertaintyWeighting')}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--iters', type=int, default=300)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--aggregators', nargs='+', choices=list(AGGREGATORS), default=list(AGGREGATORS))
    parser.add_argument('--work-dir', default='work_dirs/aggregators_shared')
    parser.add_argument('--threads', type=int, help='torch threads per run (env_cfg.num_threads; default: torch\'s)')
    parser.add_argument('--quick', action='store_true', help='2 iterations, one seed, tiny data (a smoke test)')
    args = parser.parse_args()
    synthetic = None
    with contextlib.ExitStack() as stack:
        if args.quick:
            args.iters, args.seeds = 2, args.seeds[:1]
            args.work_dir = str(enter_scratch_folder(stack) / 'runs')
            synthetic = dict(num_train=8, num_val=4)
        from mtvision.registry import METRICS
        from mtvision.config import load_config
        cfg = load_config(str(GROUPED))
        # each task's primary metric, and the normals' share within 11.25 degrees (the published NYUv2 tables' too)
        keys = [(task, METRICS.get(cfg.tasks[task].metric['type']).primary_key) for task in cfg.tasks]
        keys.insert([task for task, _ in keys].index('normals') + 1, ('normals', 'within_11.25'))
        results = {name: [] for name in args.aggregators}
        for name in args.aggregators:
            for seed in args.seeds:
                metrics = train_recipe(GROUPED, {'aggregator': AGGREGATORS[name], 'randomness.seed': seed},
                                       args.iters, Path(args.work_dir) / f'{name}_seed{seed}', synthetic,
                                       threads=args.threads)
                results[name].append({(task, key): metrics[task][key] for task, key in keys})
    columns = [f'{task} {key}' for task, key in keys]
    print(f'{"aggregator":<16}' + ''.join(f'{column:>22}' for column in columns))
    for name, runs in results.items():
        cells = []
        for column in keys:
            values = [run[column] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f'{statistics.mean(values):.3f} +- {spread:.3f}')
        print(f'{name:<16}' + ''.join(f'{cell:>22}' for cell in cells))
    print(f'summary: {len(args.seeds)} seeds x {args.iters} iterations per aggregator on the shared-image layout; '
          f'columns are each task\'s primary metric and the normals\' share within 11.25 degrees (mean +- std over '
          f'seeds)')


if __name__ == '__main__':
    main()
