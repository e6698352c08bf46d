# SimMIM on a Swin: masked squares of 16 px replaced by a mask token, one-layer pixel head, L1 on masked pixels;
# the embedded data's classification images, unlabeled, with MAE's augmentation and the 600-iteration schedule.
_base_ = [
    '../_base_/models/swin-tiny-w4_64px.py',
    '../_base_/datasets/synthetic_mae_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
_iters = 600
synthetic_data = dict(root='data/synthetic', seed=0, num_train=2000, num_val=200, image_size=64, num_classes=6)
tasks = dict(simmim={{_base_._simmim_task}})
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', eta_min_ratio=0.01, by_epoch=False, begin=50, end=_iters),
]
train_cfg = dict(max_iters=_iters, val_interval=_iters, val_at_start=True)
checkpoint_cfg = dict(interval=200, max_keep=2)
