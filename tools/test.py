"""Evaluate a checkpoint on every task's validation set.

    python tools/test.py CONFIG CKPT [--work-dir DIR] [--out FILE] [--cfg-options key=value ...]
"""
import argparse
from pathlib import Path

from mmengine.config import DictAction


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Evaluate a multi-task checkpoint')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint directory, work dir, weights file, URL or model zoo name')
    parser.add_argument('--work-dir', help='where metrics and pictures go (default: work_dirs/<config name>)')
    parser.add_argument('--out', help='metrics JSON file (default: <work-dir>/test_metrics.json)')
    parser.add_argument('--no-pictures', action='store_true', help='do not draw sample predictions')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={}, help='override config keys')
    parser.add_argument('--launcher', choices=['none'], default='none')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from mtvision.checkpoint import load_weights
    from mtvision.config import load_config
    from mtvision.engine import evaluate, metrics_table
    from mtvision.engine.logging import setup_logging, write_json
    from mtvision.models import build_model
    from mtvision.tasks import build_tasks
    from mtvision.zoo import resolve

    cfg = load_config(args.config, args.cfg_options)
    work_dir = Path(args.work_dir or cfg.get('work_dir') or Path('work_dirs') / Path(args.config).stem)
    work_dir.mkdir(parents=True, exist_ok=True)
    setup_logging()
    tasks = build_tasks(cfg.tasks, train=False)
    model = build_model(cfg, tasks)
    load_weights(model, resolve(args.checkpoint).read_weights())  # the whole model: every head is evaluated
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    pictures = None if args.no_pictures else work_dir / 'test_pictures'
    if pictures is not None:
        pictures.mkdir(exist_ok=True)
    results = evaluate(model.to(device), tasks, pictures)
    out = Path(args.out) if args.out else work_dir / 'test_metrics.json'
    write_json(out, dict(checkpoint=str(args.checkpoint), metrics=results))
    print(metrics_table(results))
    return results


if __name__ == '__main__':
    main()
