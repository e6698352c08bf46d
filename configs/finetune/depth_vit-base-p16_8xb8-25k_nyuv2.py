# NYUv2 monocular depth on a pre-trained ViT-B/16 (the Eigen split: 795 / 654 frames of tools/prepare_nyuv2.py, or
# BTS's larger "sync" set), scored by the published protocol (Eigen crop, 0-10 m): 25k iterations of a global batch
# of 64 (8 GPUs x 8) at 416 x 544 crops, AdamW lr 1e-4, weight decay 0.05, layer-wise lr decay 0.65, drop path 0.1,
# warm-up then poly decay. A recipe to adapt, not a reproduction of a published number. Start from any pre-trained
# model: tools/dist_train.sh CONFIG 8 --load-from <...>. Needs NYUv2 under data/ (README, "NYUv2"); not run in CI.
_base_ = [
    '../_base_/models/vit-base-p16_224px.py',
    '../_base_/datasets/real_4task_224px.py',
    '../_base_/schedules/adamw_warmup-cosine_100k.py',
    '../_base_/default_runtime.py',
]
_normalize = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
model = dict(backbone=dict(img_size=(416, 544), drop_path_rate=0.1, out_indices=(3, 5, 7, 11)))
tasks = dict(
    depth=dict(
        type='depth',
        head=dict(type='DepthHead', max_depth=10.0, channels=128,
                  neck=dict(type='SimpleFeaturePyramid', out_channels=256, scale_factors=(4.0, 2.0, 1.0, 0.5))),
        train_dataset=dict(type='DepthDataset', img_dir='data/nyuv2/train/rgb', depth_dir='data/nyuv2/train/depth',
                           img_suffix='.png',
                           pipeline=[dict(type='RandomCrop', size=(416, 544)), dict(type='RandomHorizontalFlip'),
                                     dict(type='ColorJitter', brightness=0.2, contrast=0.2, saturation=0.2)]
                           + _normalize),
        val_dataset=dict(type='DepthDataset', img_dir='data/nyuv2/val/rgb', depth_dir='data/nyuv2/val/depth',
                         img_suffix='.png',  # the whole frame: predictions are scored at the stored 480 x 640
                         pipeline=[dict(type='Resize', size=(416, 544), antialias=True)] + _normalize),
        batch_size=8, val_batch_size=8, num_workers=4,
        metric=dict(type='DepthMetric', max_depth=10.0, crop='eigen')),
)
optim_wrapper = dict(optimizer=dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05), clip_grad=None,
                     paramwise_cfg=dict(layer_decay_rate=0.65))
auto_scale_lr = dict(base_batch_size=64, enable=True)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=1000),
    dict(type='PolyLR', power=0.9, eta_min=0.0, by_epoch=False, begin=1000, end=25000),
]
train_cfg = dict(max_iters=25000, val_interval=2500, val_at_start=False)
checkpoint_cfg = dict(interval=2500, max_keep=3)
