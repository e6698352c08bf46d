"""Step time of the mtvision trainer vs a plain timm + torch loop, same model, data and optimizer.

One classification task (the quick start's ViT and pipeline); both loops read the same ImageFolder data with
batch size 64 and step AdamW with gradient clipping. Runs alternate (plain, mtvision, plain, mtvision, ...) so
drift in machine load hits both; each timed run starts after warm-up steps. Goal: ratio <= 1.05.

    python benchmarks/train_step.py [--steps 30] [--repeats 3] [--data data/synthetic]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

from common import ROOT, classification_trainer, run_steps
from mtvision.data.synthetic import ensure_synthetic


def plain_loop(trainer: Trainer, batch_size: int):
    """timm model + torch DataLoader + AdamW, as a user would write it; the data are the trainer's dataset."""
    backbone = trainer.cfg.model.backbone
    model = timm.create_model(backbone.model_name, img_size=backbone.img_size, patch_size=backbone.patch_size,
                              embed_dim=backbone.embed_dim, depth=backbone.depth, num_heads=backbone.num_heads,
                              num_classes=trainer.tasks['cls'].head['num_classes'])
    optimizer_cfg = trainer.cfg.optim_wrapper.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=optimizer_cfg.lr, weight_decay=optimizer_cfg.weight_decay)
    loader = DataLoader(trainer.tasks['cls'].train_dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    max_norm = trainer.cfg.optim_wrapper.clip_grad.max_norm

    def run(steps: int) -> None:
        done = 0
        while done < steps:
            for images, labels in loader:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                optimizer.step()
                done += 1
                if done == steps:
                    return
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=30, help='timed steps per run')
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--data', default=str(ROOT / 'data' / 'synthetic'))
    args = parser.parse_args()
    ensure_synthetic(args.data)
    with tempfile.TemporaryDirectory() as work_dir:
        trainer = classification_trainer(Path(args.data), Path(work_dir), args.batch_size)
        plain = plain_loop(trainer, args.batch_size)

        def mtvision_run(steps: int) -> None:
            run_steps(trainer, steps)

        runs = {'plain timm + torch': plain, 'mtvision Trainer': mtvision_run}
        for run in runs.values():
            run(args.warmup)
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run(args.steps)
                times[name].append((time.perf_counter() - start) / args.steps)
    print(f'\n{"loop":<20} {"median ms/step":>15} {"runs (ms/step)":>30}')
    for name, values in times.items():
        print(f'{name:<20} {1000 * statistics.median(values):>15.1f} {" ".join(f"{1000 * v:.1f}" for v in values):>30}')
    ratio = statistics.median(times['mtvision Trainer']) / statistics.median(times['plain timm + torch'])
    print(f'\nsummary: mtvision/plain step time ratio = {ratio:.3f} (goal <= 1.05), batch {args.batch_size}, '
          f'{args.steps} steps x {args.repeats} runs, {torch.get_num_threads()} threads')


if __name__ == '__main__':
    main()
