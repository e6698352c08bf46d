# AdamW with MAE's settings (betas 0.9 / 0.95, weight decay 0.05), 5k warm-up iterations, cosine to 100k. lr is the
# one of a global batch of auto_scale_lr.base_batch_size; other GPU counts scale it linearly (Goyal et al., 2017).
optim_wrapper = dict(
    type='AmpOptimWrapper', dtype='bfloat16',
    optimizer=dict(type='AdamW', lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05),
    clip_grad=dict(max_norm=3.0),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=5000),
    dict(type='CosineAnnealingLR', eta_min_ratio=0.01, by_epoch=False, begin=5000, end=100000),
]
train_cfg = dict(max_iters=100000, val_interval=10000, val_at_start=False)
auto_scale_lr = dict(base_batch_size=512, enable=True)
