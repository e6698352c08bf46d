"""Linear segmentation or depth probe on the frozen patch features of a backbone.

    python tools/dense_probe.py MODEL --task-type segmentation|depth --data DIR [--num-classes K] [--epochs 10]
                                [--batch-size 16] [--lr 1e-3] [--out FILE] [--config CFG] [--task NAME] ...

``--data DIR`` reads mtvision's synthetic layout (also ADE20K's once its folders are named so):
segmentation ``DIR/images/{train,val}`` + ``DIR/annotations/{train,val}``; depth ``DIR/{train,val}/{rgb,depth}``.
``--train-img-dir``, ``--train-ann-dir``, ``--val-img-dir`` and ``--val-ann-dir`` (label maps or depth maps) replace
any of these folders, e.g. for ADE20K's ``images/training`` or without ``--data`` at all. Images and maps are
resized to the backbone's input size (maps with nearest interpolation), and metrics are computed at that size.
"""
import argparse
import os

# folders under --data, per task type and split: (images, label or depth maps)
DATA_LAYOUT = {
    'segmentation': {split: (f'images/{split}', f'annotations/{split}') for split in ('train', 'val')},
    'depth': {split: (f'{split}/rgb', f'{split}/depth') for split in ('train', 'val')},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Linear segmentation / depth probe on frozen features',
                                     allow_abbrev=False)
    parser.add_argument('model', help='checkpoint directory, work dir, weights file, zoo name, or timm:<name>[@<file>]')
    parser.add_argument('--config', help='config of a weights file without an embedded one')
    parser.add_argument('--task', help='task whose router an MoE backbone uses')
    parser.add_argument('--task-type', choices=['segmentation', 'depth'], required=True)
    parser.add_argument('--data', help='dataset root in the layout above')
    for split in ('train', 'val'):
        parser.add_argument(f'--{split}-img-dir', help=f'{split} images (replaces the --data folder)')
        parser.add_argument(f'--{split}-ann-dir', help=f'{split} label or depth maps (replaces the --data folder)')
    parser.add_argument('--img-suffix', default='.jpg', help='image file ending')
    parser.add_argument('--ann-suffix', default='.png', help='label / depth map file ending')
    parser.add_argument('--num-classes', type=int, help='segmentation classes (required for segmentation)')
    parser.add_argument('--reduce-zero-label', action='store_true', help="ADE20K's labels: 0 is ignored")
    parser.add_argument('--depth-scale', type=float, default=1000.0, help='stored depth units per metre')
    parser.add_argument('--min-depth', type=float, default=1e-3, help='smallest valid depth in metres')
    parser.add_argument('--max-depth', type=float, help='largest evaluated depth in metres (default: no limit)')
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--weight-decay', type=float, default=1e-4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-workers', type=int, default=0)
    parser.add_argument('--out', help='results JSON file')
    parser.add_argument('--launcher', choices=['none', 'pytorch'], default='none',
                        help='pytorch: run under torchrun; every rank runs the same probe, rank 0 reports')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    args = parser.parse_args(argv)
    if args.task_type == 'segmentation' and args.num_classes is None:
        parser.error('--task-type segmentation needs --num-classes')
    for split in ('train', 'val'):
        if args.data is None and None in (getattr(args, f'{split}_img_dir'), getattr(args, f'{split}_ann_dir')):
            parser.error(f'give --data or both --{split}-img-dir and --{split}-ann-dir')
    return args


def _folders(args: argparse.Namespace, split: str) -> tuple[str, str]:
    default_img, default_ann = DATA_LAYOUT[args.task_type][split]
    img_dir = getattr(args, f'{split}_img_dir') or os.path.join(args.data, default_img)
    ann_dir = getattr(args, f'{split}_ann_dir') or os.path.join(args.data, default_ann)
    return img_dir, ann_dir


def build_dataset(args: argparse.Namespace, split: str, img_size: int, mean, std):
    """The split's dataset, resized to the backbone's input size and normalised with its statistics."""
    from mtvision.data import DepthDataset, SegmentationDataset

    pipeline = [dict(type='Resize', size=(img_size, img_size), antialias=True), dict(type='ToFloat'),
                dict(type='Normalize', mean=list(mean), std=list(std))]
    img_dir, ann_dir = _folders(args, split)
    if args.task_type == 'segmentation':
        return SegmentationDataset(img_dir, ann_dir, args.num_classes, pipeline=pipeline, img_suffix=args.img_suffix,
                                   seg_suffix=args.ann_suffix, reduce_zero_label=args.reduce_zero_label)
    return DepthDataset(img_dir, ann_dir, pipeline=pipeline, depth_scale=args.depth_scale, img_suffix=args.img_suffix,
                        depth_suffix=args.ann_suffix)


def results_table(results: dict) -> str:
    """Two columns: the probe's settings, then its metrics."""
    rows = [('model', results['model']), ('task type', results['task_type']), ('feature', results['feature']),
            ('head', results['head']), ('train / val images', f"{results['num_train']} / {results['num_val']}"),
            ('epochs', str(results['epochs'])), ('batch', str(results['batch_size'])),
            ('optimizer', f"{results['optimizer']} (weight decay {results['weight_decay']:g}, cosine)"),
            ('learning rate', f"{results['lr']:g}")]
    rows += [(key, f'{value:.4g}') for key, value in results['metrics'].items()]
    width = max(len(name) for name, _ in rows)
    return '\n'.join(f'{name.ljust(width)}  {value}' for name, value in rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mtvision.engine.logging import write_json
    from mtvision.probe.dense import OPTIMIZER, train_dense_probe
    from mtvision.distributed import distributed_session
    from mtvision.probe.models import load_backbone

    with distributed_session(args.launcher) as (device, rank):
        loaded = load_backbone(args.model, args.config, args.task)
        train_dataset, val_dataset = (build_dataset(args, split, loaded.img_size, loaded.mean, loaded.std)
                                      for split in ('train', 'val'))
        metrics = train_dense_probe(
            loaded.backbone, args.task_type, train_dataset, val_dataset, num_classes=args.num_classes,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            min_depth=args.min_depth, max_depth=args.max_depth, seed=args.seed, num_workers=args.num_workers,
            device=device, progress=rank == 0 and not args.no_progress)
    results = dict(model=args.model, fingerprint=loaded.fingerprint, task_type=args.task_type,
                   feature='last-block patch map', head='BatchNorm + 1x1 conv (DINOv2 linear)',
                   num_train=len(train_dataset), num_val=len(val_dataset), epochs=args.epochs,
                   batch_size=args.batch_size, optimizer=OPTIMIZER, lr=args.lr, weight_decay=args.weight_decay,
                   metrics=metrics)
    if rank == 0:
        print(results_table(results))
        if args.out:
            write_json(args.out, results)
    return results


if __name__ == '__main__':
    main()
