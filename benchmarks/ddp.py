"""Data parallelism on 2 gloo processes (CPU): throughput against 1 process, the share of the gradient exchange
hidden behind the backward, and the bytes a step exchanges.

1. Throughput: each process trains the quick start's ViT on its classification task with ``--batch-size`` images
   per step (the global batch grows with the processes, as under torchrun) and ``cores / processes`` threads. The
   1-process and 2-process runs alternate ``--repeats`` times; each run times ``--steps`` steps after warm-up, on
   rank 0, including the gradient exchange.
2. Hidden exchange: the 4-task quick start on 2 processes, with the exchange after the backward
   (``env_cfg.ddp_cfg.overlap=False``, as before the overlap was built) and overlapped with it (the default), steps
   alternating. The exchange's exposed time is the wait for it after the backward; hidden = 1 - exposed(overlapped)
   / exposed(after the backward), medians over the steps. Also the share of the exchanged bytes launched while the
   backward ran. On a machine with fewer cores than compute threads plus gloo's communication threads, the
   exchange competes with the backward for the cores and the time hidden varies from run to run.
3. Traffic: the elements handed to each collective in one step, counted by wrapping torch.distributed, turned into
   the bytes each rank sends under a ring algorithm (all-reduce 2 (W - 1) / W of the tensor, reduce-scatter and
   all-gather (W - 1) / W of the whole), for the weighted sum and for parameter-level gradient surgery (AlignedMTL)
   at T = 4, as multiples of the size of the gradient.

    python benchmarks/ddp.py [--steps 20] [--repeats 3] [--batch-size 32] [--data data/synthetic]
        [--exchange-steps 16] [--bucket-cap-mb 1]
"""
import argparse
import contextlib
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import QUICKSTART, ROOT, classification_trainer, run_steps
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


RING_SHARE = {'all_reduce': lambda world: 2 * (world - 1) / world}
RING_SHARE.update(dict.fromkeys(['reduce_scatter_tensor', 'reduce_scatter_single', 'all_gather_into_tensor',
                                 'all_gather_single'], lambda world: (world - 1) / world))


@contextlib.contextmanager
def counted_traffic(sent: list) -> Iterator[None]:
    """Within the block, each tensor collective appends the bytes this rank sends for it under a ring algorithm."""
    world = dist.get_world_size()
    originals = {name: getattr(dist, name) for name in RING_SHARE if hasattr(dist, name)}

    def counting(name):
        def collective(*args, **kwargs):
            tensors = [arg for arg in args[:2] if isinstance(arg, torch.Tensor)]
            largest = max(tensors, key=torch.Tensor.numel)
            sent.append(RING_SHARE[name](world) * largest.numel() * largest.element_size())
            return originals[name](*args, **kwargs)
        return collective
    for name in originals:
        setattr(dist, name, counting(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def quickstart_trainer(work_dir: Path, data: str, **options):
    from mtvision.config import load_config
    from mtvision.engine import Trainer

    cfg = load_config(str(QUICKSTART), {'log_cfg.tensorboard': False, 'log_cfg.visualize': False,
                                        'checkpoint_cfg.save_last': False, 'synthetic_data': None, **options})
    cfg.tasks = json.loads(json.dumps(cfg.to_dict()['tasks']).replace('data/synthetic', str(data)))
    return Trainer(cfg, work_dir, validate=False)


def exchange_worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world_size)
    try:
        ddp = dict(bucket_cap_mb=args.bucket_cap_mb)
        trainers = {'after the backward': quickstart_trainer(out / 'after', args.data, **{
                        'env_cfg.ddp_cfg': dict(ddp, overlap=False)}),
                    'overlapped': quickstart_trainer(out / 'overlap', args.data, **{'env_cfg.ddp_cfg': ddp})}
        iterators = {name: trainer._train_iterators() for name, trainer in trainers.items()}
        exposed = {name: [] for name in trainers}
        backward = {name: [] for name in trainers}
        launched = {name: [] for name in trainers}  # share of the bytes launched while the backward ran
        for step in range(args.exchange_steps + 2):
            for name, trainer in trainers.items():
                dist.barrier()
                start = time.perf_counter()
                trainer._forward_backward(list(trainer.tasks), iterators[name])
                if step >= 2:  # warm-up
                    exposed[name].append(trainer.reducer.exposed_seconds)
                    backward[name].append(time.perf_counter() - start)
                    launched[name].append(trainer.reducer.bytes_during_backward / trainer.reducer.bytes_exchanged)
        trainer = trainers['overlapped']
        gradient_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
        traffic = {}
        for name, aggregator in [('WeightedSum', dict(type='WeightedSum')),
                                 ('AlignedMTL (T = 4)', dict(type='AlignedMTL'))]:
            counted = quickstart_trainer(out / name, args.data, aggregator=aggregator)
            sent = []
            with counted_traffic(sent):
                counted._forward_backward(list(counted.tasks), counted._train_iterators())
            shared = sum(p.numel() * p.element_size() for p in counted.model.shared_parameters())
            traffic[name] = dict(bytes=sum(sent), collectives=len(sent), shared=shared, total=gradient_bytes)
        if rank == 0:
            torch.save(dict(exposed=exposed, step=backward, launched=launched, traffic=traffic,
                            buckets=len(trainer.reducer._buckets)), out / 'exchange.pt')
    finally:
        dist.destroy_process_group()


def exchange_report(args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        mp.spawn(exchange_worker, args=(2, free_port(), args, out), nprocs=2, join=True)
        result = torch.load(out / 'exchange.pt', weights_only=True)
    exposed = {name: statistics.median(values) for name, values in result['exposed'].items()}
    steps = {name: statistics.median(values) for name, values in result['step'].items()}
    print(f'\n4-task quick start, 2 processes, {result["buckets"]} buckets of <= {args.bucket_cap_mb} MB, medians of '
          f'{args.exchange_steps} steps')
    launched = {name: statistics.median(values) for name, values in result['launched'].items()}
    print(f'{"exchange":>20} {"forward+backward ms":>20} {"exposed exchange ms":>20} {"hidden":>7} '
          f'{"bytes launched during the backward":>35}')
    baseline = exposed['after the backward']
    hidden = {}
    for name in exposed:
        hidden[name] = 1 - exposed[name] / baseline
        print(f'{name:>20} {steps[name] * 1e3:>20.1f} {exposed[name] * 1e3:>20.1f} {hidden[name]:>7.1%} '
              f'{launched[name]:>35.1%}')
    print(f'\n{"one step":>20} {"bytes sent per rank":>20} {"collectives":>12} {"x all gradients":>16} '
          f'{"x backbone gradient, heads excluded":>36}')
    for name, traffic in result['traffic'].items():
        heads = traffic['total'] - traffic['shared']  # the heads' gradients are all-reduced once
        traffic['backbone_multiple'] = (traffic['bytes'] - heads) / traffic['shared']
        print(f'{name:>20} {traffic["bytes"]:>20,.0f} {traffic["collectives"]:>12} '
              f'{traffic["bytes"] / traffic["total"]:>16.2f} {traffic["backbone_multiple"]:>36.2f}')
    return hidden['overlapped'], launched['overlapped'], result['traffic']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=20, help='timed steps per throughput run')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=32, help='images per process and step')
    parser.add_argument('--exchange-steps', type=int, default=16, help='steps of each exchange mode')
    parser.add_argument('--bucket-cap-mb', type=float, default=1.0,
                        help='bucket size of the exchange: the quick start has 8.7 MB of gradients, which 1 MB buckets '
                             'cut into 10, about as many as the default 25 MB buckets make of a ViT-B/16 (344 MB)')
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
    hidden, launched, traffic = exchange_report(args)
    surgery = traffic['AlignedMTL (T = 4)']
    print(f'\nsummary: 2 processes / 1 process throughput = {medians[2] / medians[1]:.3f} on {os.cpu_count()} CPU '
          f'cores, batch {args.batch_size} per process; exchange hidden behind the backward: before 0.0%, after '
          f'{hidden:.1%} ({launched:.1%} of its bytes launched during the backward); bytes per step: weighted sum '
          f'{traffic["WeightedSum"]["bytes"]:,.0f}, AlignedMTL at T = 4 '
          f'{surgery["bytes"]:,.0f} ({surgery["backbone_multiple"]:.2f} backbone gradients, (T + 1) / 2 = 2.5, '
          f'plus the heads once)')


if __name__ == '__main__':
    main()
