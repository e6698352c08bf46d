"""Step time of the mtvision trainer vs a plain timm + torch loop, same model, data and optimizer.

One classification task (the quick start's ViT and pipeline, or ViT-B/16 at 224 px with ``--preset vit-b16``);
both loops read the same ImageFolder data and step AdamW with gradient clipping, on the GPU when there is one
(optionally under bf16 or fp16 autocast, fp16 with a grad scaler in both). Runs alternate (plain, mtvision, plain,
mtvision, ...) so drift in machine load hits both; each timed run starts after warm-up steps. Goal: ratio <= 1.05.

    python benchmarks/train_step.py [--steps 30] [--repeats 3] [--data data/synthetic]
    python benchmarks/train_step.py --preset vit-b16 --amp bf16 --batch-size 128 --num-workers 8   # on a GPU
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

from common import ROOT, classification_trainer
from mtvision.data.synthetic import ensure_synthetic


# ViT-B/16 at 224 px (the real-data recipes' backbone) on the synthetic images resized to 224
VIT_B16 = {'model.backbone.model_name': 'vit_base_patch16_224', 'model.backbone.img_size': 224,
           'model.backbone.patch_size': 16, 'model.backbone.embed_dim': 768, 'model.backbone.depth': 12,
           'model.backbone.num_heads': 12}
VIT_B16_PIPELINE = [dict(type='Resize', size=(224, 224), antialias=True), dict(type='RandomHorizontalFlip'),
                    dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406),
                                                std=(0.229, 0.224, 0.225))]
AMP_DTYPES = {'none': None, 'bf16': 'bfloat16', 'fp16': 'float16'}


def plain_loop(trainer, batch_size: int, num_workers: int):
    """timm model + torch DataLoader + AdamW, as a user would write it; the data are the trainer's dataset, the
    device and autocast the trainer's."""
    backbone = trainer.cfg.model.backbone
    device = trainer.device
    model = timm.create_model(backbone.model_name, img_size=backbone.img_size, patch_size=backbone.patch_size,
                              embed_dim=backbone.embed_dim, depth=backbone.depth, num_heads=backbone.num_heads,
                              num_classes=trainer.tasks['cls'].head['num_classes']).to(device)
    optimizer_cfg = trainer.cfg.optim_wrapper.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=optimizer_cfg.lr, weight_decay=optimizer_cfg.weight_decay)
    loader = DataLoader(trainer.tasks['cls'].train_dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=device.type == 'cuda')
    max_norm = trainer.cfg.optim_wrapper.clip_grad.max_norm
    autocast = trainer.autocast
    scaler = torch.amp.GradScaler(device.type) if trainer.scaler is not None else None

    def run(steps: int) -> None:
        done = 0
        while done < steps:
            for images, labels in loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with torch.autocast(**autocast):
                    loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                    scaler.step(optimizer)
                    scaler.update()
                done += 1
                if done == steps:
                    return
    return run


def synchronized(run, device: torch.device):
    """``run`` followed by a wait for the device, so a timer around it counts the queued GPU work."""
    def wrapped(steps: int) -> None:
        run(steps)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=30, help='timed steps per run')
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--data', default=str(ROOT / 'data' / 'synthetic'))
    parser.add_argument('--preset', choices=['quickstart', 'vit-b16'], default='quickstart',
                        help="the model: the quick start's tiny ViT at 64 px, or ViT-B/16 at 224 px")
    parser.add_argument('--amp', choices=list(AMP_DTYPES), default='none', help='autocast dtype in both loops')
    parser.add_argument('--num-workers', type=int, default=0, help='data-loading processes in both loops')
    args = parser.parse_args()
    ensure_synthetic(args.data)
    options = {'tasks.cls.num_workers': args.num_workers}
    if args.preset == 'vit-b16':
        options.update(VIT_B16)
    if AMP_DTYPES[args.amp]:
        options.update({'optim_wrapper.type': 'AmpOptimWrapper', 'optim_wrapper.dtype': AMP_DTYPES[args.amp]})
    with tempfile.TemporaryDirectory() as work_dir:
        trainer = classification_trainer(Path(args.data), Path(work_dir), args.batch_size,
                                         pipeline=VIT_B16_PIPELINE if args.preset == 'vit-b16' else None, **options)
        plain = synchronized(plain_loop(trainer, args.batch_size, args.num_workers), trainer.device)

        iterators = {}

        def mtvision_run(steps: int) -> None:
            # the body of Trainer.train's loop, on loaders kept across runs (as in one long run): train() would
            # start new loader workers for every timed run
            if not iterators:
                iterators.update(trainer._train_iterators())
                trainer.model.train()
            for _ in range(steps):
                losses, terms = trainer._forward_backward(trainer.mixer.next_tasks(), iterators)
                trainer._optimizer_step(losses, terms)
                trainer.step += 1

        runs = {'plain timm + torch': plain, 'mtvision Trainer': synchronized(mtvision_run, trainer.device)}
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
    images_per_s = {name: args.batch_size / statistics.median(values) for name, values in times.items()}
    print(f'\nsummary: mtvision/plain step time ratio = {ratio:.3f} (goal <= 1.05), {args.preset} on '
          f'{trainer.device}, amp {args.amp}, batch {args.batch_size}, {args.num_workers} workers, '
          f'{args.steps} steps x {args.repeats} runs, {torch.get_num_threads()} threads; images/s: plain '
          f'{images_per_s["plain timm + torch"]:.0f}, mtvision {images_per_s["mtvision Trainer"]:.0f}')


if __name__ == '__main__':
    main()
