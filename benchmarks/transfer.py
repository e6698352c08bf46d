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
                                  [--tasks normals tags] [--work-dir work_dirs/transfer] [--quick]

Runs finished earlier in ``--work-dir`` are read back, not trained again. ``--quick`` runs 2 iterations of each
stage on a tiny generated copy of the data, one seed, two backbones (a smoke test of the script).
"""
import argparse
import contextlib
import statistics
from pathlib import Path

from common import ROOT, enter_scratch_folder, train_recipe

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--pretrain-iters', type=int, default=600)
    parser.add_argument('--finetune-iters', type=int, default=200)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--backbones', nargs='+', choices=list(BACKBONES), default=list(BACKBONES))
    parser.add_argument('--tasks', nargs='+', choices=list(HELD_OUT), default=list(HELD_OUT), help='held-out tasks')
    parser.add_argument('--threads', type=int, help="torch threads per run (env_cfg.num_threads; default: torch's)")
    parser.add_argument('--work-dir', default='work_dirs/transfer')
    parser.add_argument('--quick', action='store_true', help='2 iterations per stage, one seed, tiny data')
    args = parser.parse_args()
    tiny = None
    with contextlib.ExitStack() as stack:
        if args.quick:
            args.pretrain_iters, args.finetune_iters, args.seeds = 2, 2, args.seeds[:1]
            args.backbones = args.backbones[:2]
            args.work_dir = str(enter_scratch_folder(stack) / 'runs')
            tiny = dict(num_train=8, num_val=6)
        root = Path(args.work_dir)
        results = {}
        for name in args.backbones:
            recipe, pretrained = BACKBONES[name], None
            if recipe is not None:
                config, overrides, tasks = recipe
                pretrained = root / 'pretrain' / name.replace(' ', '_').replace(',', '').replace('+', 'and')
                train_recipe(config, {**overrides, 'randomness.seed': 0}, args.pretrain_iters, pretrained, tiny,
                             tasks, threads=args.threads)
            for mode, paramwise in MODES.items():
                for task in args.tasks:
                    key, values = HELD_OUT[task], []
                    for seed in args.seeds:
                        work_dir = root / mode / task / f'{pretrained.name if pretrained else "random"}_seed{seed}'
                        options = {'randomness.seed': seed, 'optim_wrapper.paramwise_cfg': paramwise}
                        values.append(train_recipe(SHARED, options, args.finetune_iters, work_dir, tiny, [task],
                                                   pretrained, args.threads)[task][key])
                    results[name, mode, task] = values
    columns = [(mode, task) for mode in MODES for task in args.tasks]
    print(f'{"backbone":<24}' + ''.join(f'{f"{task} {HELD_OUT[task]} ({mode})":>26}' for mode, task in columns))
    for name in args.backbones:
        cells = []
        for mode, task in columns:
            values = results[name, mode, task]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f'{statistics.mean(values):.2f} +- {spread:.2f}')
        print(f'{name:<24}' + ''.join(f'{cell:>26}' for cell in cells))
    names = {'normals': 'normals (mean angular error, degrees, lower is better)',
             'tags': 'multi-label tags (mAP %, higher is better)'}
    print(f'summary: {len(args.backbones)} backbones pre-trained {args.pretrain_iters} iterations, transferred '
          f'{args.finetune_iters} iterations x {len(args.seeds)} seeds to held-out '
          f'{" and ".join(names[task] for task in args.tasks)}')


if __name__ == '__main__':
    main()
