# AdamW, linear warm-up then cosine decay, iteration-based: the 600-iteration budget of the embedded-data recipes,
# evaluated before training (for the table of untrained vs trained metrics) and at the end.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=1.0),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', eta_min_ratio=0.01, by_epoch=False, begin=50, end=600),
]
train_cfg = dict(max_iters=600, val_interval=600, val_at_start=True)
