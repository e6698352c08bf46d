"""Transfer of pre-trained backbones to tasks their pre-training did not see: fine-tuned and probed, several seeds.

Backbones, each pre-trained once on the embedded data (``--pretrain-iters`` iterations of its config, seed 0):
random initialisation (no pre-training); classification alone; the quick start's four supervised tasks with the
weighted sum and with Aligned-MTL; the full mixture (MAE + SimCLR + the four supervised tasks). Held-out tasks, on
the shared-image layout's images (other scenes, other task types): surface normals and multi-label classification.
Each (backbone, task, seed) is trained for ``--finetune-iters`` iterations from the backbone (``--load-from``: its
weights load, the new head starts fresh) in two ways: fine-tuned (layer-wise lr decay 0.65, as
``configs/finetune/``) and probed (the backbone frozen: ``custom_keys={'backbone': dict(lr_mult=0.0)}``, only the
head trains). Printed: each task's primary metric (normals: mean angular error in degrees, lower is better; tags: mAP
in %, higher is better) as mean +- std over the seeds.

    python benchmarks/transfer.py [--pretrain-iters 600] [--finetune-iters 200] [--seeds 0 1 2] [--threads N]
                                  [--work-dir work_dirs/transfer] [--quick]

Runs finished earlier in ``--work-dir`` are read back, not trained again. ``--quick`` runs 2 iterations of each
stage on a tiny generated copy of the data, one seed, two backbones (a smoke test of the script).
"""
import argparse
import contextlib
import json
import os
import statistics
import tempfile
from pathlib import Path

from common import ROOT

QUICKSTART = ROOT / 'configs' / 'quickstart' / 'vit-tiny-p8_4task_synthetic.py'
MIXTURE = ROOT / 'configs' / 'mixture' / 'full-mixture_vit-tiny-p8_600it_synthetic.py'
SHARED = ROOT / 'configs' / 'shared' / 'seg-depth-normals-tags_vit-tiny-p8_600it_synthetic.py'
BACKBONES = {  # name -> (config, overrides, tasks kept) or None: no pre-training
    'random init': None,
    'cls only': (QUICKSTART, {}, ['cls']),
    '4 tasks, sum': (QUICKSTART, {}, None),
    '4 tasks, Aligned-MTL': (QUICKSTART, {'aggregator': dict(type='AlignedMTL')}, None),
    'MAE + SimCLR + 4 tasks': (MIXTURE, {}, None),
}
HELD_OUT = {'normals': 'mean', 'tags': 'mAP'}  # task of the shared-image config -> its primary metric
MODES = {'fine-tune': dict(layer_decay_rate=0.65), 'probe': dict(custom_keys={'backbone': dict(lr_mult=0.0)})}


def finished(work_dir: Path, iters: int) -> dict | None:
    path = work_dir / 'metrics.json'
    if path.is_file() and json.loads(path.read_text())['step'] == iters:
        return json.loads(path.read_text())['metrics']
    return None


def common_options(iters: int, seed: int, threads: int | None) -> dict:
    return {'randomness.seed': seed, 'train_cfg.max_iters': iters, 'train_cfg.val_interval': iters,
            'train_cfg.val_at_start': False, 'checkpoint_cfg.interval': iters, 'checkpoint_cfg.save_last': True,
            'log_cfg.tensorboard': False, 'log_cfg.visualize': False, 'log_cfg.interval': iters,
            'env_cfg.num_threads': threads}


def run(config: Path, options: dict, tasks: list[str] | None, iters: int, work_dir: Path, tiny: dict | None,
        load_from: Path | None = None) -> dict:
    """Train ``config`` (its ``tasks`` only, when given) for ``iters`` iterations; its validation metrics."""
    from mtvision.config import load_config
    from mtvision.data.synthetic import ensure_synthetic
    from mtvision.engine import Trainer
    from mtvision.engine.extraction import shortened_schedule

    done = finished(work_dir, iters)
    if done is not None:
        return done
    cfg = load_config(str(config), options)
    cfg.param_scheduler = shortened_schedule(cfg.to_dict()['param_scheduler'], iters)
    if tasks is not None:
        cfg.tasks = {name: cfg.tasks[name] for name in tasks}
    if tiny is not None:
        cfg.synthetic_data = dict(cfg.synthetic_data, **tiny)
        for task in cfg.tasks.values():
            task.val_batch_size = min(task.val_batch_size, 4)
    ensure_synthetic(**cfg.synthetic_data)
    return Trainer(cfg, work_dir, load_from=str(load_from) if load_from else None).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--pretrain-iters', type=int, default=600)
    parser.add_argument('--finetune-iters', type=int, default=200)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--backbones', nargs='+', choices=list(BACKBONES), default=list(BACKBONES))
    parser.add_argument('--threads', type=int, help="torch threads per run (env_cfg.num_threads; default: torch's)")
    parser.add_argument('--work-dir', default='work_dirs/transfer')
    parser.add_argument('--quick', action='store_true', help='2 iterations per stage, one seed, tiny data')
    args = parser.parse_args()
    tiny = None
    with contextlib.ExitStack() as stack:
        if args.quick:
            args.pretrain_iters, args.finetune_iters, args.seeds = 2, 2, args.seeds[:1]
            args.backbones = args.backbones[:2]
            scratch = stack.enter_context(tempfile.TemporaryDirectory())
            stack.callback(os.chdir, os.getcwd())
            os.chdir(scratch)  # the configs' relative data paths now lead into the scratch folder
            args.work_dir = str(Path(scratch) / 'runs')
            tiny = dict(num_train=8, num_val=6)
        root = Path(args.work_dir)
        results = {}
        for name in args.backbones:
            recipe, pretrained = BACKBONES[name], None
            if recipe is not None:
                config, overrides, tasks = recipe
                pretrained = root / 'pretrain' / name.replace(' ', '_').replace(',', '').replace('+', 'and')
                run(config, {**overrides, **common_options(args.pretrain_iters, 0, args.threads)}, tasks,
                    args.pretrain_iters, pretrained, tiny)
            for mode, paramwise in MODES.items():
                for task, key in HELD_OUT.items():
                    values = []
                    for seed in args.seeds:
                        work_dir = root / mode / task / f'{pretrained.name if pretrained else "random"}_seed{seed}'
                        options = {**common_options(args.finetune_iters, seed, args.threads),
                                   'optim_wrapper.paramwise_cfg': paramwise}
                        values.append(run(SHARED, options, [task], args.finetune_iters, work_dir, tiny,
                                          pretrained)[task][key])
                    results[name, mode, task] = values
    columns = [(mode, task) for mode in MODES for task in HELD_OUT]
    print(f'{"backbone":<24}' + ''.join(f'{f"{task} {HELD_OUT[task]} ({mode})":>26}' for mode, task in columns))
    for name in args.backbones:
        cells = []
        for mode, task in columns:
            values = results[name, mode, task]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f'{statistics.mean(values):.2f} +- {spread:.2f}')
        print(f'{name:<24}' + ''.join(f'{cell:>26}' for cell in cells))
    print(f'summary: {len(args.backbones)} backbones pre-trained {args.pretrain_iters} iterations, transferred '
          f'{args.finetune_iters} iterations x {len(args.seeds)} seeds to held-out normals (mean angular error, '
          f'degrees, lower is better) and multi-label tags (mAP %, higher is better)')


if __name__ == '__main__':
    main()
