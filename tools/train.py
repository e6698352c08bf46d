"""Train a multi-task model from a config.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--load-from CKPT] [--amp]
                                 [--cfg-options key=value ...] [--launcher none|pytorch] [--seed N]
"""
import argparse
import contextlib
import logging
import os
from pathlib import Path

from mmengine.config import DictAction


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a multi-task model')
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from CKPT (a checkpoint directory or work dir), or with no value from the work '
                             'dir\'s last checkpoint')
    parser.add_argument('--load-from', help='start from these weights: a checkpoint, work dir, weights file, URL, '
                                            'model zoo name or timm:<name>@<file>')
    parser.add_argument('--amp', action='store_true', help='mixed precision (fp16 on CUDA, bf16 on CPU)')
    parser.add_argument('--amp-dtype', choices=['fp16', 'bf16'], help='mixed-precision dtype (implies --amp)')
    parser.add_argument('--no-validate', action='store_true', help='no evaluation during training')
    parser.add_argument('--seed', type=int, help='random seed (randomness.seed)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config keys, e.g. train_cfg.max_iters=100 tasks.cls.batch_size=16')
    parser.add_argument('--launcher', choices=['none', 'pytorch'], default='none',
                        help='pytorch: started by torchrun, one process per device (tools/dist_train.sh); NCCL on '
                             'CUDA, gloo on CPU')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Train; returns the last evaluation's metrics. A failure exits with status 1 after logging why on one line (the
    traceback goes to the run folder's train.log): a batch job's log says why it died."""
    args = parse_args(argv)
    from mtvision.distributed import distributed_session
    from mtvision.engine.logging import exit_on_error, setup_logging

    setup_logging(rank=int(os.environ.get('RANK', 0)))  # the console, until the config names the work dir
    with exit_on_error('training'), distributed_session(args.launcher):
        return train(args)


def start_log(work_dir: Path, rank: int, checkpoint: Path | None = None) -> Path | None:
    """Log to ``train.log`` in this run's folder of ``work_dir`` (rank 0 creates it; returns it, None elsewhere): a
    new folder, or when resuming ``checkpoint`` the folder of the run that wrote it, whose log goes on."""
    from mtvision.engine.logging import open_run_dir, setup_logging

    run_dir = open_run_dir(work_dir, checkpoint) if rank == 0 else None
    setup_logging(run_dir, rank)
    return run_dir


def checkpoint_to_resume(work_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint ``resume`` names (``'auto'``: the work dir's last one), None when there is none or it cannot
    be read (the trainer then says why)."""
    from mtvision.zoo import resume_checkpoint

    try:
        return resume_checkpoint(resume, work_dir)
    except (OSError, ValueError):
        return None


def work_dir_of(args: argparse.Namespace, cfg=None) -> Path:
    """``--work-dir``, else the config's ``work_dir``, else ``work_dirs/<config name>``."""
    return Path(args.work_dir or (cfg or {}).get('work_dir') or Path('work_dirs') / Path(args.config).stem)


def train(args: argparse.Namespace) -> dict:
    import torch

    from mtvision.config import load_config
    from mtvision.data.synthetic import ensure_synthetic
    from mtvision.distributed import is_main_process, rank_and_world
    from mtvision.engine import Trainer
    from mtvision.engine.logging import collect_env, write_json

    main_process = is_main_process()
    rank, world_size = rank_and_world()
    try:
        cfg = load_config(args.config, args.cfg_options)
    except Exception:
        # a config that cannot be read names no work dir: its error goes to the one the command line implies (a
        # mistyped config path gets no folder of its own)
        if args.work_dir or Path(args.config).is_file():
            with contextlib.suppress(OSError):
                start_log(work_dir_of(args), rank)
        raise
    if args.seed is not None:
        cfg.merge_from_dict({'randomness.seed': args.seed})
    if args.amp or args.amp_dtype:
        dtype = {'fp16': 'float16', 'bf16': 'bfloat16', None: None}[args.amp_dtype]
        cfg.merge_from_dict({'optim_wrapper.type': 'AmpOptimWrapper', 'optim_wrapper.dtype': dtype})
    work_dir = work_dir_of(args, cfg)
    resume = args.resume if args.resume is not None else ('auto' if cfg.get('resume') else None)
    run_dir = start_log(work_dir, rank, checkpoint_to_resume(work_dir, resume) if main_process else None)
    num_threads = cfg.get('env_cfg', {}).get('num_threads')
    local_processes = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    if not num_threads and local_processes > 1 and not torch.cuda.is_available():
        # processes sharing a machine's cores must share them out: oversubscribed, 2 processes with 2 threads
        # each on 2 cores ran 2.8x slower than with 1 thread each
        num_threads = max(1, (os.cpu_count() or 1) // local_processes)
    if num_threads:
        torch.set_num_threads(num_threads)
    if cfg.get('synthetic_data'):
        if main_process:
            ensure_synthetic(**cfg.synthetic_data)
        if world_size > 1:
            torch.distributed.barrier()  # the data exists before any rank reads it
    if main_process:
        cfg.dump(str(work_dir / 'config.py'))  # the work dir's: the config of its latest run
        cfg.dump(str(run_dir / 'config.py'))
        write_json(run_dir / 'env.json', collect_env(world_size))

    trainer = Trainer(cfg, work_dir, resume=resume, load_from=args.load_from or cfg.get('load_from'),
                      validate=not args.no_validate, run_dir=run_dir)
    results = trainer.train()
    logging.getLogger('mtvision').info('work dir: %s, logs in %s', work_dir, trainer.run_dir or run_dir)
    return results


if __name__ == '__main__':
    main()
