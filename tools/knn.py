"""Weighted kNN classification (DINO / DINOv2 protocol) on frozen features of a backbone.

    python tools/knn.py MODEL --data DIR [--val DIR] [--val-ann-file FILE] [--ks 10 20 100 200] [--temperature 0.07]
                        [--feature cls|avgpool|cls+avgpool|last4|last4+avgpool] [--out FILE]

MODEL is a checkpoint directory or work dir, a weights file, or ``timm:<name>[@<weights file>]``. ``--data`` holds
``train/`` and ``val/`` class folders (or is the training class folders when ``--val`` is given); ``--val-ann-file``
reads the val labels from a list instead (mmpretrain's ``val.txt``, Kaggle's ``LOC_val_solution.csv``). Features are
cached under ``--cache-dir``, so runs with other ``--ks``, ``--temperature`` or ``--feature`` skip the backbone.
"""
import argparse
import os

from mtvision.probe.features import FEATURE_NAMES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Weighted kNN classification on frozen backbone features')
    parser.add_argument('model', help='checkpoint directory, work dir, weights file, zoo name, or timm:<name>[@<file>]')
    parser.add_argument('--config', help='model config, for weights files without an embedded one')
    parser.add_argument('--task', help='task whose MoE routing the backbone uses')
    parser.add_argument('--data', required=True, help='folder with train/ and val/ class folders, or the train '
                                                      'class folders when --val is given')
    parser.add_argument('--val', help='folder of validation class folders (or images, with --val-ann-file)')
    parser.add_argument('--val-ann-file',
                        help="label list of the val images instead of class folders: mmpretrain's val.txt "
                             "('<relpath> <class index>') or Kaggle's LOC_val_solution.csv; paths relative to the "
                             'val folder, labels indexing the sorted train class folders')
    parser.add_argument('--ks', type=int, nargs='+', default=[10, 20, 100, 200], help='numbers of neighbours')
    parser.add_argument('--temperature', type=float, default=0.07, help='weights are exp(similarity / T)')
    parser.add_argument('--feature', choices=FEATURE_NAMES, default='cls', help='feature the neighbours are found on')
    parser.add_argument('--crop-pct', type=float, default=0.875,
                        help="timm's evaluation: resize the short side to floor(img_size / crop_pct) (bicubic), "
                             'then centre crop img_size')
    parser.add_argument('--batch-size', type=int, default=64, help='images per forward pass (per process)')
    parser.add_argument('--num-workers', type=int, default=min(4, os.cpu_count() or 1),
                        help='data loading workers per process (default: min(4, cores))')
    parser.add_argument('--cache-dir', default='work_dirs/feature_cache', help='feature cache folder')
    parser.add_argument('--out', help='results JSON file')
    parser.add_argument('--launcher', choices=['none', 'pytorch'], default='none',
                        help='pytorch: one process per device under torchrun, each extracting a shard')
    return parser.parse_args(argv)


def results_table(results: dict) -> str:
    """The header line of the run's settings and one row of top-1 / top-5 per k."""
    from mtvision.engine.logging import text_table

    header = (f"kNN on {results['feature']}, T={results['temperature']:g}: {results['num_train']} train, "
              f"{results['num_val']} val images, {results['num_classes']} classes")
    rows = [('k', 'top1 %', 'top5 %')] + [(str(row['k']), f"{row['top1']:.2f}", f"{row['top5']:.2f}")
                                          for row in results['results']]
    return '\n'.join([header, text_table(rows, right_align=True)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mtvision.engine.logging import setup_logging, write_json
    from mtvision.evaluation import Accuracy
    from mtvision.distributed import distributed_session
    from mtvision.probe.features import classification_features, knn_classify
    from mtvision.probe.models import load_backbone

    with distributed_session(args.launcher) as (device, rank):
        setup_logging(rank=rank)
        loaded = load_backbone(args.model, config=args.config, task=args.task)
        loaded.backbone.to(device)
        features, classes = classification_features(loaded, args.data, args.val, args.cache_dir, task=args.task,
                                                    crop_pct=args.crop_pct, val_ann_file=args.val_ann_file,
                                                    batch_size=args.batch_size, num_workers=args.num_workers)
        num_classes = len(classes)
        scores = knn_classify(features['train'].select(args.feature).to(device), features['train'].labels,
                              features['val'].select(args.feature), num_classes, ks=args.ks,
                              temperature=args.temperature)
        rows = []
        for k, k_scores in scores.items():
            accuracy = Accuracy(topk=(1, 5))
            accuracy.update(k_scores.cpu(), features['val'].labels)
            rows.append(dict(k=k, **accuracy.compute()))
        results = dict(model=args.model, task=args.task, feature=args.feature, temperature=args.temperature,
                       num_train=len(features['train']), num_val=len(features['val']), num_classes=num_classes,
                       results=rows)
        if rank == 0:
            print(results_table(results))
            if args.out:
                write_json(args.out, results)
        return results


if __name__ == '__main__':
    main()
