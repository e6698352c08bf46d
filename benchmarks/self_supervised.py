"""Self-supervised objectives at one budget: frozen-feature probes of DINO + iBOT, SimCLR and MAE against random init.

Each recipe (the embedded data's classification images, labels unused; the quick start's ViT) trains for
``--iters`` iterations from the same initial weights per seed; then its frozen backbone is probed on the embedded
classification data: weighted kNN top-1 at k = 20 (``tools/knn.py``) and the linear sweep's best top-1
(``tools/linear_probe.py``: chosen on a held-out part of the training images, scored on the 200 validation images).
Printed: mean +- std over the seeds, and each recipe's seconds per training step (the trainer's own timing).

    python benchmarks/self_supervised.py [--iters 600] [--seeds 0] [--threads N] [--recipes dino simclr mae]
                                         [--work-dir work_dirs/self_supervised] [--cfg-options key=value ...]
                                         [--quick]

``--cfg-options`` changes every recipe's config (e.g. ``--recipes dino --cfg-options tasks.dino.head.ibot=None``,
with a ``--work-dir`` of its own).

Runs finished earlier in ``--work-dir`` are read back. ``--quick``: 2 iterations on tiny data, one seed.
"""
import argparse
import contextlib
import json
import statistics
from pathlib import Path

from common import QUICKSTART, ROOT, add_run_arguments, frozen_probes, initial_weights, start_runs, train_recipe

RECIPES = {
    'dino': ROOT / 'configs' / 'dino' / 'dino_vit-tiny-p8_600it_synthetic.py',
    'simclr': ROOT / 'configs' / 'contrastive' / 'simclr_vit-tiny-p8_600it_synthetic.py',
    'mae': ROOT / 'configs' / 'mae' / 'mae_vit-tiny-p8_600it_synthetic.py',
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--iters', type=int, default=600)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--recipes', nargs='+', choices=list(RECIPES), default=list(RECIPES))
    add_run_arguments(parser, 'work_dirs/self_supervised')
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        tiny = start_runs(args, stack)
        root = Path(args.work_dir)
        data = Path('data/synthetic/classification')
        results = {name: [] for name in ['random init', *args.recipes]}
        seconds = {}
        for seed in args.seeds:
            start = initial_weights(QUICKSTART, seed, root / f'init_seed{seed}.safetensors')
            if tiny is not None:  # the probes need the data before any recipe generated it
                from mtvision.data.synthetic import ensure_synthetic
                ensure_synthetic('data/synthetic', seed=0, image_size=64, num_classes=6, **tiny)
            results['random init'].append(frozen_probes(start, data, root / 'cache'))
            for name in args.recipes:
                work_dir = root / f'{name}_seed{seed}'
                train_recipe(RECIPES[name], {**args.cfg_options, 'randomness.seed': seed}, args.iters, work_dir, tiny,
                             load_from=start, threads=args.threads)
                seconds[name] = step_seconds(work_dir)
                results[name].append(frozen_probes(work_dir, data, root / 'cache'))
    print(f'{"backbone":<14}{"kNN k=20 top-1 %":>20}{"linear top-1 %":>20}{"s / iteration":>16}')
    for name, runs in results.items():
        cells = []
        for key in ('knn', 'linear'):
            values = [run[key] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f'{statistics.mean(values):.1f} +- {spread:.1f}')
        cost = f'{seconds[name]:.3f}' if name in seconds else '-'
        print(f'{name:<14}{cells[0]:>20}{cells[1]:>20}{cost:>16}')
    best = max(args.recipes, key=lambda name: statistics.mean(run['knn'] for run in results[name]))
    gain = statistics.mean(r['knn'] for r in results[best]) - statistics.mean(r['knn'] for r in results['random init'])
    print(f'summary: {args.iters} iterations x {len(args.seeds)} seeds; best kNN: {best}, {gain:+.1f} points over '
          f'random init; dino / random init kNN ratio '
          f'{_ratio(results, "dino", "random init") if "dino" in results else float("nan"):.3f}')


def step_seconds(work_dir: Path) -> float:
    """The mean seconds per training step of the run's last logging window (its last run folder's log: after a
    resume, the resumed part)."""
    from mtvision.engine.logging import latest_run_dir

    records = [json.loads(line) for line in (latest_run_dir(work_dir) / 'scalars.jsonl').read_text().splitlines()]
    return [record for record in records if 'time' in record][-1]['time']


def _ratio(results: dict, name: str, baseline: str) -> float:
    return statistics.mean(r['knn'] for r in results[name]) / statistics.mean(r['knn'] for r in results[baseline])


if __name__ == '__main__':
    main()
