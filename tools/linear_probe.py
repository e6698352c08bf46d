"""Linear probe of a frozen backbone: DINOv2's sweep on cached features, or MAE's protocol on augmented images.

    python tools/linear_probe.py MODEL --data DIR [--val DIR] [--val-ann-file FILE] [--protocol sweep|mae]
                                 [--feature NAME ...]
                                 [--iterations N | --epochs N] [--batch-size N] [--lrs LR ...] [--no-standardise]
                                 [--grid-extensions N] [--blr LR] [--optimizer lars|sgd] [--out FILE]

MODEL is a checkpoint directory or work dir, a weights file, or ``timm:<name>[@<weights file>]``. ``--data`` holds
``train/`` and ``val/`` class folders, or is the training class folders when ``--val`` is given. ``--val-ann-file``
reads the val labels from a list instead (the flat ImageNet val folder with mmpretrain's ``val.txt``, or Kaggle's
``LOC_val_solution.csv``). Evaluation images are resized and centre-cropped as timm does. The sweep caches
features under ``--cache-dir`` with the keys of ``tools/knn.py``, so the two share extractions.

Sweep defaults: 1,000 iterations of batch 128 whatever the dataset's size (``--epochs N`` counts passes instead;
``--iterations 12500`` is DINOv2's length, for ImageNet-sized sets), features standardised with the training
split's mean and deviation (``--no-standardise`` feeds them raw, as DINOv2), and 13 base rates from 1e-4 to 1
(scaled by batch / 256) that grow by a decade, up to twice, when the chosen rate is at an end of the grid; rates
given with ``--lrs`` are trained as given (unless ``--grid-extensions N``), and a best rate still at an end is
logged as a warning.
"""
import argparse
import os

# the sweep's length defaults to a number of iterations (mtvision.probe.linear.SWEEP_ITERATIONS), not of epochs
PROTOCOL_DEFAULTS = dict(mae=dict(epochs=90, batch_size=256), sweep=dict(epochs=None, batch_size=128))


def parse_args(argv=None) -> argparse.Namespace:
    # the module docstring's last paragraph: the sweep's defaults, under the options
    parser = argparse.ArgumentParser(description='Linear probe of a frozen backbone',
                                     epilog=__doc__[__doc__.index('Sweep defaults:'):])
    parser.add_argument('model', help='checkpoint dir, work dir, weights file, zoo name, or timm:<name>[@<file>]')
    parser.add_argument('--config', help='training config, for weights files without an embedded one')
    parser.add_argument('--task', help='task whose router a mixture-of-experts backbone uses')
    parser.add_argument('--data', required=True, help='folder with train/ and val/ class folders, or the train '
                                                      'class folders when --val is given')
    parser.add_argument('--val', help='folder of validation class folders (or images, with --val-ann-file)')
    parser.add_argument('--val-ann-file',
                        help="label list of the val images instead of class folders: mmpretrain's val.txt "
                             "('<relpath> <class index>') or Kaggle's LOC_val_solution.csv; paths relative to the "
                             'val folder, labels indexing the sorted train class folders')
    parser.add_argument('--protocol', choices=['sweep', 'mae'], default='sweep',
                        help='sweep: DINOv2 grid of features x learning rates on cached features; '
                             'mae: MAE linear probe (BatchNorm + linear, LARS) on augmented images')
    parser.add_argument('--feature', nargs='+',
                        help="features: the sweep's grid (default: all), or the MAE probe's one (default: cls)")
    parser.add_argument('--epochs', type=int,
                        help='passes over the training set (default: mae 90; the sweep counts --iterations instead)')
    parser.add_argument('--iterations', type=int,
                        help='sweep: training iterations whatever the dataset size (default: 1000; not with --epochs)')
    parser.add_argument('--batch-size', type=int, help='total batch (default: mae 256, sweep 128)')
    parser.add_argument('--blr', type=float, default=0.1, help='mae: base learning rate, lr = blr * batch / 256')
    parser.add_argument('--optimizer', choices=['lars', 'sgd'], default='lars', help='mae: optimizer')
    parser.add_argument('--warmup-epochs', type=int,
                        help="mae: linear warm-up epochs (default: MAE's 10 of 90, scaled to --epochs)")
    parser.add_argument('--weight-decay', type=float, default=0.0, help='mae: weight decay')
    parser.add_argument('--lrs', type=float, nargs='+',
                        help='sweep: base learning rates, scaled by batch / 256 (default: 13 from 1e-4 to 1, in steps '
                             'of 1-2-5, extended by --grid-extensions; given rates are trained as given)')
    parser.add_argument('--grid-extensions', type=int,
                        help='sweep: times a best rate at an end of the grid adds a decade beyond it (default: 2 for '
                             'the default grid, 0 with --lrs); a best rate left at an end is warned about')
    parser.add_argument('--no-standardise', action='store_true',
                        help="sweep: feed the features raw (DINOv2) instead of standardised by the training split's "
                             'mean and deviation')
    parser.add_argument('--val-fraction', type=float, default=0.0,
                        help='sweep: part of the training set held out to choose the best head; 0 (the default, '
                             "DINOv2's protocol) chooses on the val split")
    parser.add_argument('--crop-pct', type=float, default=0.875,
                        help="evaluation as timm's: resize the short side to floor(img_size / crop_pct) (bicubic), "
                             'then centre crop img_size')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-workers', type=int, default=min(4, os.cpu_count() or 1),
                        help='data loading workers per process (default: min(4, cores))')
    parser.add_argument('--cache-dir', default='work_dirs/feature_cache', help='sweep: feature cache folder')
    parser.add_argument('--out', help='results JSON file')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.add_argument('--launcher', choices=['none', 'pytorch'], default='none')
    args = parser.parse_args(argv)
    if args.protocol == 'sweep' and args.epochs is not None and args.iterations is not None:
        parser.error(f'--epochs {args.epochs} and --iterations {args.iterations}: give one of the two')
    if args.protocol == 'mae' and args.iterations is not None:
        parser.error('--iterations is for the sweep; the MAE protocol counts --epochs')
    return args


def train_pipeline(img_size: int, mean, std) -> list[dict]:
    """MAE's linear-probe augmentation: random resized crop and horizontal flip."""
    return [dict(type='RandomResizedCrop', size=img_size), dict(type='RandomHorizontalFlip'), dict(type='ToFloat'),
            dict(type='Normalize', mean=list(mean), std=list(std))]


def results_table(results: dict) -> str:
    """One row per reported head: feature, epochs (passes over the training split, fractional when the sweep counts
    iterations), iterations, batch, optimizer, base and scaled learning rates (the scaled one,
    ``base_lr * batch / 256``, is what the optimizer used), top-1, top-5 per split."""
    from mtvision.engine.logging import text_table

    if results['protocol'] == 'mae':
        rows = [dict(split='val', feature=results['feature'], base_lr=results['blr'], lr=results['lr'],
                     top1=results['top1'], top5=results['top5'])]
    else:
        best = results['best']
        splits = [key for key in ('held_out', 'val') if key in best]
        rows = [dict(split=split, feature=best['feature'], base_lr=best['lr'], lr=best['scaled_lr'], **best[split])
                for split in splits]
    header = ('split', 'feature', 'epochs', 'iters', 'batch', 'optimizer', 'base_lr', 'lr', 'top-1', 'top-5')
    lines = [header] + [(row['split'], row['feature'], f"{results['epochs']:.3g}", str(results['iterations']),
                         str(results['batch_size']),
                         results['optimizer'], f'{row["base_lr"]:.4g}', f'{row["lr"]:.4g}', f'{row["top1"]:.2f}',
                         f'{row["top5"]:.2f}') for row in rows]
    return text_table(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mtvision.engine.logging import setup_logging, write_json
    from mtvision.distributed import distributed_session
    from mtvision.probe.features import (FEATURE_NAMES, classification_features, eval_pipeline, image_folder_splits,
                                         probe_datasets)
    from mtvision.probe.linear import linear_sweep, train_linear_probe_mae
    from mtvision.probe.models import load_backbone

    with distributed_session(args.launcher) as (device, rank):
        setup_logging(rank=rank)
        defaults = PROTOCOL_DEFAULTS[args.protocol]
        epochs = args.epochs if args.epochs is not None else defaults['epochs']
        batch_size = args.batch_size if args.batch_size is not None else defaults['batch_size']
        train_root, val_root = image_folder_splits(args.data, args.val)
        loaded = load_backbone(args.model, config=args.config, task=args.task)
        backbone = loaded.backbone.to(device)
        pipeline = eval_pipeline(loaded.img_size, loaded.mean, loaded.std, args.crop_pct)
        progress = rank == 0 and not args.no_progress

        if args.protocol == 'mae':
            features = args.feature or ['cls']
            if len(features) != 1:
                raise ValueError(f'the MAE protocol trains one probe; --feature names {features}')
            train_set, val_set = probe_datasets(args.data, args.val, pipeline,
                                                train_pipeline(loaded.img_size, loaded.mean, loaded.std),
                                                val_ann_file=args.val_ann_file)
            results = train_linear_probe_mae(
                backbone, train_set, val_set, len(train_set.classes), feature=features[0], epochs=epochs,
                batch_size=batch_size, blr=args.blr,
                warmup_epochs=args.warmup_epochs if args.warmup_epochs is not None else round(epochs * 10 / 90),
                weight_decay=args.weight_decay, optimizer=args.optimizer, num_workers=args.num_workers,
                device=device, seed=args.seed, progress=progress)
        else:
            features, classes = classification_features(loaded, args.data, args.val, args.cache_dir, task=args.task,
                                                        crop_pct=args.crop_pct, val_ann_file=args.val_ann_file,
                                                        batch_size=batch_size, num_workers=args.num_workers,
                                                        progress=progress)
            n_blocks = features['train'].cls_tokens.shape[1]
            # a backbone of fewer than 4 blocks has no 'last4' features
            names = args.feature or [name for name in FEATURE_NAMES if n_blocks == 4 or not name.startswith('last4')]
            results = linear_sweep(features['train'], features['val'], len(classes),
                                   lrs=args.lrs, features=names, epochs=epochs, iterations=args.iterations,
                                   batch_size=batch_size, val_fraction=args.val_fraction, seed=args.seed,
                                   device=device, progress=progress, standardise=not args.no_standardise,
                                   grid_extensions=args.grid_extensions)

        results = dict(model=args.model, task=args.task, train=str(train_root), val=str(val_root),
                       val_ann_file=args.val_ann_file, **results)
        if rank == 0:
            print(results_table(results))
            if args.out:
                write_json(args.out, results)
        return results


if __name__ == '__main__':
    main()
