# The quick start: a tiny ViT trained jointly on classification, detection, segmentation and depth of the
# embedded synthetic data, fp32 on CPU, in a few minutes on 2 cores. The table printed at the end compares each
# task's metric before training (val_at_start) with the trained model.
_base_ = [
    '../_base_/models/vit-tiny-p8_64px.py',
    '../_base_/datasets/synthetic_4task_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
_iters = 600
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', eta_min_ratio=0.01, by_epoch=False, begin=50, end=_iters),
]
train_cfg = dict(max_iters=_iters, val_interval=_iters, val_at_start=True)
checkpoint_cfg = dict(interval=200, max_keep=2)
