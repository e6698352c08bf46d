"""Audit every task's data of a config: every problem, with its file and index, before a run meets the first one.

    python tools/check_data.py CONFIG [--cfg-options key=value ...] [--split train val] [--max-problems N]
                                     [--num-workers N] [--out report.json] [--strict]

Prints a table grouped by task and split and a count line; exits with status 1 when an error was found (with
``--strict``, also when only warnings were). See mtvision/data/audit.py for what is checked.
"""
import argparse
import sys

from mmengine.config import DictAction


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Audit the datasets of a multi-task config')
    parser.add_argument('config', help='config file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={}, help='override config keys')
    parser.add_argument('--split', nargs='+', choices=['train', 'val'], default=['train', 'val'],
                        help='splits to audit (default: both)')
    parser.add_argument('--max-problems', type=int, help='stop reading a dataset after this many findings')
    parser.add_argument('--num-workers', type=int,
                        help='processes that read the samples (default: each task\'s num_workers)')
    parser.add_argument('--out', help='also write the findings to this JSON file')
    parser.add_argument('--strict', action='store_true', help='warnings also make the exit status 1')
    args = parser.parse_args(argv)
    if args.max_problems is not None and args.max_problems < 1:
        parser.error(f'--max-problems must be positive, got {args.max_problems}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from mtvision.config import load_config
    from mtvision.data.audit import audit_tasks, format_findings
    from mtvision.engine.logging import setup_logging, write_json

    cfg = load_config(args.config, args.cfg_options)
    setup_logging()
    findings = audit_tasks(cfg.tasks, splits=args.split, max_problems=args.max_problems,
                           num_workers=args.num_workers)
    print(format_findings(findings))
    errors = sum(finding.level == 'error' for finding in findings)
    warnings = len(findings) - errors
    if args.out:
        write_json(args.out, dict(config=args.config, splits=list(args.split), errors=errors, warnings=warnings,
                                  findings=[finding.to_dict() for finding in findings]))
    return int(errors > 0 or (args.strict and warnings > 0))


if __name__ == '__main__':
    sys.exit(main())
