# ADE20K semantic segmentation with UperNet on a pre-trained ViT-B/16 at 512 x 512, the protocol of BEiT and MAE
# (mmsegmentation's): 160k iterations of a global batch of 16 (8 GPUs x 2), AdamW lr 1e-4, weight decay 0.05,
# layer-wise lr decay 0.65, 1.5k warm-up iterations then poly decay (power 1), drop path 0.1; evaluated by sliding
# 512 x 512 windows over images whose short side is 512, at the stored labels' resolution. MAE reports 48.1 mIoU for its
# ViT-B. The position table of a 224 px pre-training is resampled to the 32 x 32 grid at load. Start from any
# pre-trained model: tools/dist_train.sh CONFIG 8 --load-from <work dir | checkpoint | zoo name | URL>. Needs ADE20K
# under data/ (README, "ADE20K"); not run in CI.
_base_ = [
    '../_base_/models/vit-base-p16_224px.py',
    '../_base_/datasets/real_4task_224px.py',
    '../_base_/schedules/adamw_warmup-cosine_100k.py',
    '../_base_/default_runtime.py',
]
_normalize = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
model = dict(backbone=dict(img_size=512, drop_path_rate=0.1, out_indices=(3, 5, 7, 11)))
tasks = dict(
    seg=dict(
        type='segmentation',
        head=dict(type='UPerHead', num_classes=150, channels=512, pool_scales=(1, 2, 3, 6),
                  neck=dict(type='SimpleFeaturePyramid', out_channels=768, scale_factors=(4.0, 2.0, 1.0, 0.5))),
        train_dataset=dict(type='SegmentationDataset', img_dir='data/ade20k/images/training',
                           ann_dir='data/ade20k/annotations/training', num_classes=150, reduce_zero_label=True,
                           pipeline=[dict(type='RandomResizedCrop', size=512, scale=(0.5, 1.0), antialias=True),
                                     dict(type='RandomHorizontalFlip'),
                                     dict(type='ColorJitter', brightness=0.125, contrast=0.5, saturation=0.5,
                                          hue=0.05)] + _normalize),
        # mmseg's test Resize(scale=(2048, 512), keep_ratio=True): short side 512, long side at most 2048
        val_dataset=dict(type='SegmentationDataset', img_dir='data/ade20k/images/validation',
                         ann_dir='data/ade20k/annotations/validation', num_classes=150, reduce_zero_label=True,
                         pipeline=[dict(type='Resize', size=512, max_size=2048, antialias=True)] + _normalize),
        batch_size=2, val_batch_size=1, num_workers=4, metric=dict(type='SegmentationMetric', num_classes=150),
        test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341))),
)
optim_wrapper = dict(optimizer=dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05), clip_grad=None,
                     paramwise_cfg=dict(layer_decay_rate=0.65))
auto_scale_lr = dict(base_batch_size=16, enable=True)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]
train_cfg = dict(max_iters=160000, val_interval=16000, val_at_start=False)
checkpoint_cfg = dict(interval=16000, max_keep=3)
