# The quick start on a tiny Swin: four maps (strides 4 to 32) feed the dense heads' feature pyramids; Swin has
# no class token, so classification reads the mean token.
_base_ = [
    '../_base_/models/swin-tiny-w4_64px.py',
    '../_base_/datasets/synthetic_4task_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
_iters = 600
tasks = dict(cls=dict(head=dict(feature='avg')))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', eta_min_ratio=0.01, by_epoch=False, begin=50, end=_iters),
]
train_cfg = dict(max_iters=_iters, val_interval=_iters, val_at_start=True)
checkpoint_cfg = dict(interval=200, max_keep=2)
