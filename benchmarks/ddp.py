"""Data-parallel throughput: 1 process vs 2 processes (gloo, on CPU), images per second.

Each process trains the quick start's ViT on its classification task with ``--batch-size`` images per step (the
global batch grows with the processes, as under torchrun) and ``cores / processes`` threads. The 1-process and
2-process runs alternate ``--repeats`` times; each run times ``--steps`` steps after warm-up, on rank 0, including
the gradient all-reduce.

    python benchmarks/ddp.py [--steps 20] [--repeats 3] [--batch-size 32] [--data data/synthetic]
"""
import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import ROOT, classification_trainer, run_steps
from mtvision.data.synthetic import ensure_synthetic


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if world_size > 1:
        dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size)
    try:
        trainer = classification_trainer(Path(args.data), out / 'work', args.batch_size)
        run_steps(trainer, args.warmup)
        if world_size > 1:
            dist.barrier()
        start = time.perf_counter()
        run_steps(trainer, args.steps)
        seconds = time.perf_counter() - start
        if rank == 0:
            (out / 'seconds').write_text(str(seconds))
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def images_per_second(world_size: int, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        mp.spawn(worker, args=(world_size, free_port(), args, out), nprocs=world_size, join=True)
        return world_size * args.batch_size * args.steps / float((out / 'seconds').read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=20, help='timed steps per run')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=32, help='images per process and step')
    parser.add_argument('--data', default=str(ROOT / 'data' / 'synthetic'))
    args = parser.parse_args()
    ensure_synthetic(args.data)
    rates = {1: [], 2: []}
    for _ in range(args.repeats):
        for world_size in rates:
            rates[world_size].append(images_per_second(world_size, args))
    medians = {world_size: statistics.median(values) for world_size, values in rates.items()}
    print(f'\n{"processes":>9} {"threads each":>12} {"images/s":>9}  runs')
    for world_size, values in rates.items():
        threads = max(1, (os.cpu_count() or 1) // world_size)
        print(f'{world_size:>9} {threads:>12} {medians[world_size]:>9.1f}  ' + ' '.join(f'{v:.1f}' for v in values))
    print(f'\nsummary: 2 processes / 1 process throughput = {medians[2] / medians[1]:.3f} on {os.cpu_count()} CPU '
          f'cores, batch {args.batch_size} per process')


if __name__ == '__main__':
    main()
