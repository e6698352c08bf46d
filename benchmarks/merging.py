"""Joint multi-task training against merging single-task models trained for the same number of steps.

Per seed, every run starts from the same initial weights (the quick start's model at that seed; with
``--pretrained SPEC``, its backbone replaced by that pre-trained model's, the heads as initialised):

- joint: the quick start's four tasks (classification, detection, segmentation, depth) trained together for
  ``--iters`` iterations, with the weighted sum and with Aligned-MTL;
- single-task: each task alone for ``--iters`` iterations (so each task sees as many of its batches as in the joint
  runs), then merged by ``tools/merge_models.py``: uniform soup, task arithmetic and TIES (density 0.2), the base
  being the initial weights and the scale chosen on the validation sets (``--ta-scales``, ``--ties-scales``).

Printed per model: each task's primary metric on its validation set (``tools/test.py``) and the frozen backbone's
classification probes (kNN top-1 at k = 20 and the linear sweep's best top-1 on the classification images: a task
every model was trained on, so it measures the features rather than transfer), mean +- std over the seeds. The
merges' scales are chosen on the same validation sets they are scored on, which favours them slightly.

    python benchmarks/merging.py [--iters 300] [--seeds 0 1 2] [--threads N] [--work-dir work_dirs/merging]
                                 [--pretrained SPEC] [--cfg-options key=value ...] [--quick]

Merging methods assume fine-tunes of one pre-trained model; ``--pretrained`` (any weights ``--load-from`` takes,
e.g. a self-supervised run's work dir) gives them that start, with a ``--work-dir`` of its own; ``--cfg-options``
changes every training run's config (e.g. ``optim_wrapper.optimizer.lr=1e-4`` for gentler fine-tunes).

Runs finished earlier in ``--work-dir`` are read back. ``--quick``: 2 iterations on tiny data, one seed.
"""
import argparse
import contextlib
import statistics
from pathlib import Path

from common import QUICKSTART, add_run_arguments, frozen_probes, initial_weights, start_runs, tool, train_recipe

TASKS = {'cls': 'top1', 'det': 'mAP', 'seg': 'mIoU', 'depth': 'abs_rel'}  # task -> primary metric
JOINT = {'joint, sum': {}, 'joint, Aligned-MTL': {'aggregator': dict(type='AlignedMTL')}}
MERGES = ('uniform soup', 'task arithmetic', 'TIES')


def merge(method: str, singles: list[Path], init: Path, out: Path, args) -> dict:
    """Merge ``singles`` with ``method`` into ``out`` (read back when done) and score the merged model."""
    if not (out / 'merged.safetensors').is_file():
        argv = [str(path) for path in singles] + ['--out', str(out)]
        if method == 'uniform soup':
            argv += ['--method', 'uniform']
        elif method == 'task arithmetic':
            argv += ['--method', 'task-arithmetic', '--base', str(init), '--scales', *map(str, args.ta_scales)]
        else:
            argv += ['--method', 'ties', '--base', str(init), '--density', '0.2',
                     '--scales', *map(str, args.ties_scales)]
        tool('merge_models').main(argv)
    return evaluated(out / 'merged.py', out / 'merged.safetensors', out)


def pretrained_start(init: Path, pretrained: str, path: Path) -> Path:
    """``init``'s weights with the backbone of ``pretrained`` (its ``backbone.*`` weights, which must match
    ``init``'s names and shapes), written to ``path``: the runs' common start and the merges' base."""
    from mtvision.fileio import load_weights_file, read_file_metadata, save_weights_file
    from mtvision.zoo.resolve import resolve

    if not path.is_file():
        state = load_weights_file(init)
        backbone = {key: value for key, value in resolve(pretrained).read_weights().items()
                    if key.startswith('backbone.')}
        mismatched = sorted(key for key in state.keys() | backbone.keys() if key.startswith('backbone.') and (
            key not in state or key not in backbone or state[key].shape != backbone[key].shape))
        if mismatched:
            raise ValueError(f'--pretrained {pretrained}: its backbone does not match the quick start\'s at '
                             f'{mismatched[:10]}')
        save_weights_file(path, {**state, **backbone}, metadata=read_file_metadata(init))
    return path


def evaluated(config: Path, weights: Path, work_dir: Path) -> dict:
    """``tools/test.py``'s metrics of a model (read back from its metrics file when done)."""
    import json

    out = work_dir / 'test_metrics.json'
    if not out.is_file():
        tool('test').main([str(config), str(weights), '--work-dir', str(work_dir), '--no-pictures'])
    return json.loads(out.read_text())['metrics']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--iters', type=int, default=300)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--ta-scales', type=float, nargs='+', default=[0.3, 0.5, 0.7, 1.0])
    parser.add_argument('--ties-scales', type=float, nargs='+', default=[0.5, 1.0, 1.5])
    parser.add_argument('--pretrained', help='the backbone every run starts from (default: random init)')
    add_run_arguments(parser, 'work_dirs/merging')
    args = parser.parse_args()
    rows = [*JOINT, 'single-task models', *MERGES]
    results = {row: [] for row in rows}
    with contextlib.ExitStack() as stack:
        tiny = start_runs(args, stack)
        root = Path(args.work_dir)
        data = Path('data/synthetic/classification')
        for seed in args.seeds:
            init = initial_weights(QUICKSTART, seed, root / f'init_seed{seed}.safetensors')
            if args.pretrained:
                init = pretrained_start(init, args.pretrained, root / f'pretrained_init_seed{seed}.safetensors')
            options = {**args.cfg_options, 'randomness.seed': seed}
            for name, overrides in JOINT.items():
                work_dir = root / f'{name.replace(", ", "-").replace(" ", "")}_seed{seed}'
                metrics = train_recipe(QUICKSTART, {**options, **overrides}, args.iters, work_dir, tiny,
                                       load_from=init, threads=args.threads)
                results[name].append(dict(metrics, probes=frozen_probes(work_dir, data, root / 'cache')))
            singles, own = [], {}
            for task in TASKS:
                work_dir = root / f'single-{task}_seed{seed}'
                own[task] = train_recipe(QUICKSTART, options, args.iters, work_dir, tiny, [task], load_from=init,
                                         threads=args.threads)[task]
                singles.append(work_dir)
            results['single-task models'].append(own)  # each task scored by its own model; no shared backbone
            for method in MERGES:
                out = root / f'{method.replace(" ", "-")}_seed{seed}'
                metrics = merge(method, singles, init, out, args)
                results[method].append(dict(metrics, probes=frozen_probes(
                    out / 'merged.safetensors', data, root / 'cache', config=out / 'merged.py')))
    columns = [*(f'{task} {key}' for task, key in TASKS.items()), 'kNN top-1', 'linear top-1']
    print(f'{"model":<22}' + ''.join(f'{column:>18}' for column in columns))
    for row in rows:
        cells = []
        for task, key in TASKS.items():
            cells.append(_mean_std([run[task][key] for run in results[row]]))
        for probe in ('knn', 'linear'):
            values = [run['probes'][probe] for run in results[row] if 'probes' in run]
            cells.append(_mean_std(values) if values else '-')
        print(f'{row:<22}' + ''.join(f'{cell:>18}' for cell in cells))
    joint = statistics.mean(run['seg']['mIoU'] for run in results['joint, sum'])
    best_merge = max(MERGES, key=lambda m: statistics.mean(run['seg']['mIoU'] for run in results[m]))
    merged = statistics.mean(run['seg']['mIoU'] for run in results[best_merge])
    start = f'from {args.pretrained}' if args.pretrained else 'from random init'
    print(f'summary: {args.iters} iterations x {len(args.seeds)} seeds {start}; seg mIoU joint (sum) / best merge '
          f'({best_merge}) = {joint / merged if merged else float("nan"):.3f}')


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.3f} +- {spread:.3f}'


if __name__ == '__main__':
    main()
