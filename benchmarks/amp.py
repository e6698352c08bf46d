"""Training step time in fp32 vs bf16 autocast (and fp16 with a grad scaler on CUDA), same model and data.

The quick start's ViT on its classification task (batch 64), the mtvision trainer end to end. Runs alternate
between precisions so drift in machine load hits all of them; each reported time is the median over ``--repeats``
runs of ``--steps`` steps after warm-up. On a CPU without bf16 matrix units bf16 is emulated and slower: there it
is for correctness (the same code path as on a GPU), not speed.

    python benchmarks/amp.py [--steps 20] [--repeats 3] [--batch-size 64] [--data data/synthetic]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, classification_trainer, run_steps
from mtvision.data.synthetic import ensure_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=20, help='timed steps per run')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--data', default=str(ROOT / 'data' / 'synthetic'))
    args = parser.parse_args()
    ensure_synthetic(args.data)
    precisions = {'fp32': {}, 'bf16': {'optim_wrapper.type': 'AmpOptimWrapper', 'optim_wrapper.dtype': 'bfloat16'}}
    if torch.cuda.is_available():
        precisions['fp16'] = {'optim_wrapper.type': 'AmpOptimWrapper', 'optim_wrapper.dtype': 'float16'}
    with tempfile.TemporaryDirectory() as work_dir:
        trainers = {name: classification_trainer(Path(args.data), Path(work_dir) / name, args.batch_size, **options)
                    for name, options in precisions.items()}
        for trainer in trainers.values():
            run_steps(trainer, args.warmup)
        times = {name: [] for name in trainers}
        for _ in range(args.repeats):
            for name, trainer in trainers.items():
                if trainer.device.type == 'cuda':
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run_steps(trainer, args.steps)
                if trainer.device.type == 'cuda':
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) / args.steps)
    device = next(iter(trainers.values())).device
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f'\n{"precision":<10} {"median ms/step":>15} {"images/s":>9} {"vs fp32":>8}  runs (ms/step)')
    for name, values in times.items():
        print(f'{name:<10} {1000 * medians[name]:>15.1f} {args.batch_size / medians[name]:>9.1f} '
              f'{medians[name] / medians["fp32"]:>8.3f}  ' + ' '.join(f'{1000 * v:.1f}' for v in values))
    ratios = ', '.join(f'{name}/fp32 {medians[name] / medians["fp32"]:.3f}' for name in medians if name != 'fp32')
    print(f'\nsummary: step time {ratios} on {device} ({torch.get_num_threads()} threads), batch {args.batch_size}')


if __name__ == '__main__':
    main()
