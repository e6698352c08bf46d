"""Step time of the mtvision trainer vs a plain timm + torch loop, same model, data and optimizer.

One classification task (the quick start's ViT and pipeline, or ViT-B/16 at 224 px with ``--preset vit-b16``);
both loops read the same ImageFolder data and step AdamW with gradient clipping, on the GPU when there is one
(optionally under bf16 or fp16 autocast, fp16 with a grad scaler in both). Runs alternate (plain, mtvision, plain,
mtvision, ...) so drift in machine load hits both; each timed run starts after warm-up steps. Goal: ratio <= 1.05.

Both loops run again on one fixed batch already on the device ("model only": forward, backward and optimizer step
without the data path), which tells a data-bound run from a compute-bound one. MFU (model FLOPs utilisation) is the
achieved training FLOP/s over the device's dense bf16 peak (mtvision.engine.flops), with the backbone's FLOPs per
image counted once for both loops (same architecture); it is shown on known GPUs or with ``--peak-tflops``.

    python benchmarks/train_step.py [--steps 30] [--repeats 3] [--data data/synthetic]
    python benchmarks/train_step.py --preset vit-b16 --amp bf16 --batch-size 128 --num-workers 12   # on a GPU
"""
import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

from common import ROOT, classification_trainer, synchronized
from mtvision.data.synthetic import ensure_synthetic
from mtvision.engine.flops import peak_flops, training_flops_per_image


# ViT-B/16 at 224 px (the real-data recipes' backbone) on the synthetic images resized to 224
VIT_B16 = {'model.backbone.model_name': 'vit_base_patch16_224', 'model.backbone.img_size': 224,
           'model.backbone.patch_size': 16, 'model.backbone.embed_dim': 768, 'model.backbone.depth': 12,
           'model.backbone.num_heads': 12}
VIT_B16_PIPELINE = [dict(type='Resize', size=(224, 224), antialias=True), dict(type='RandomHorizontalFlip'),
                    dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406),
                                                std=(0.229, 0.224, 0.225))]
AMP_DTYPES = {'none': None, 'bf16': 'bfloat16', 'fp16': 'float16'}
PLAIN, MTVISION, MODEL_ONLY = 'plain timm + torch', 'mtvision Trainer', '(fixed batch)'


def plain_loop(trainer, batch_size: int, num_workers: int, fixed_batch: dict | None = None):
    """timm model + torch DataLoader + AdamW, as a user would write it; the data are the trainer's dataset, the
    device and autocast the trainer's. With ``fixed_batch`` (on the device) every step trains on it, no loader."""
    backbone = trainer.cfg.model.backbone
    device = trainer.device
    model = timm.create_model(backbone.model_name, img_size=backbone.img_size, patch_size=backbone.patch_size,
                              embed_dim=backbone.embed_dim, depth=backbone.depth, num_heads=backbone.num_heads,
                              num_classes=trainer.tasks['cls'].head['num_classes']).to(device)
    optimizer_cfg = trainer.cfg.optim_wrapper.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=optimizer_cfg.lr, weight_decay=optimizer_cfg.weight_decay)
    if fixed_batch is None:
        loader = DataLoader(trainer.tasks['cls'].train_dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                            num_workers=num_workers, persistent_workers=num_workers > 0,
                            pin_memory=device.type == 'cuda')
    else:
        loader = [(fixed_batch['images'], fixed_batch['targets'])]
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
    parser.add_argument('--peak-tflops', type=float,
                        help="the device's dense bf16 peak for MFU (default: known GPUs' datasheet value)")
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
        iterators = trainer._train_iterators()
        trainer.model.train()
        fixed_pair = next(iterators['cls'])  # (host batch, device batch), as the trainer's iterators give them
        fixed_batch = fixed_pair[1]
        fixed_iterators = {'cls': itertools.repeat(fixed_pair)}

        def mtvision_loop(task_iterators: dict):
            def run(steps: int) -> None:
                # the body of Trainer.train's loop, on loaders kept across runs (as in one long run): train()
                # would start new loader workers for every timed run
                for _ in range(steps):
                    losses, terms = trainer._forward_backward(trainer.mixer.next_tasks(), task_iterators)
                    trainer._optimizer_step(losses, terms)
                    trainer.step += 1
            return synchronized(run, trainer.device)

        runs = {PLAIN: synchronized(plain_loop(trainer, args.batch_size, args.num_workers), trainer.device),
                MTVISION: mtvision_loop(iterators),
                f'{PLAIN} {MODEL_ONLY}': synchronized(plain_loop(trainer, args.batch_size, args.num_workers,
                                                                 fixed_batch), trainer.device),
                f'{MTVISION} {MODEL_ONLY}': mtvision_loop(fixed_iterators)}
        for run in runs.values():
            run(args.warmup)
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run(args.steps)
                times[name].append((time.perf_counter() - start) / args.steps)
        flops_per_image = training_flops_per_image(trainer.model)['cls']
        peak = peak_flops(trainer.device, args.peak_tflops)

    medians = {name: statistics.median(values) for name, values in times.items()}
    images_per_s = {name: args.batch_size / median for name, median in medians.items()}
    mfu = {name: f'{100 * flops_per_image * rate / peak:.1f}%' if peak else 'n/a'
           for name, rate in images_per_s.items()}
    print(f'\n{"loop":<32} {"median ms/step":>15} {"images/s":>9} {"MFU":>6}  runs (ms/step)')
    for name, values in times.items():
        print(f'{name:<32} {1000 * medians[name]:>15.1f} {images_per_s[name]:>9.0f} {mfu[name]:>6}  '
              + ' '.join(f'{1000 * v:.1f}' for v in values))
    ratio = medians[MTVISION] / medians[PLAIN]
    model_ratio = medians[f'{MTVISION} {MODEL_ONLY}'] / medians[f'{PLAIN} {MODEL_ONLY}']
    print(f'training GFLOPs per image {flops_per_image / 1e9:.1f} (backbone, forward + backward); peak '
          + (f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (no MFU; --peak-tflops sets it)'))
    print(f'\nsummary: mtvision/plain step time ratio = {ratio:.3f} (goal <= 1.05), model only {model_ratio:.3f}; '
          f'{args.preset} on {trainer.device}, amp {args.amp}, batch {args.batch_size}, {args.num_workers} workers, '
          f'{args.steps} steps x {args.repeats} runs, {torch.get_num_threads()} threads; images/s: plain '
          f'{images_per_s[PLAIN]:.0f}, mtvision {images_per_s[MTVISION]:.0f}, model only plain '
          f'{images_per_s[f"{PLAIN} {MODEL_ONLY}"]:.0f}, mtvision {images_per_s[f"{MTVISION} {MODEL_ONLY}"]:.0f}; '
          f'MFU: plain {mfu[PLAIN]}, mtvision {mfu[MTVISION]}, model only plain {mfu[f"{PLAIN} {MODEL_ONLY}"]}, '
          f'mtvision {mfu[f"{MTVISION} {MODEL_ONLY}"]}')

if __name__ == '__main__':
    main()
