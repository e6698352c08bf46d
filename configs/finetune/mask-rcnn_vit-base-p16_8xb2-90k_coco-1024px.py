# COCO instance segmentation with Mask R-CNN on a pre-trained ViT-B/16 and the ViTDet simple feature pyramid (Li et
# al. 2022), at 1024 x 1024 with large-scale jitter (scale 0.1-2.0), ViTDet's optimizer settings for ViT-B (AdamW lr
# 1e-4, weight decay 0.1, layer-wise lr decay 0.7, drop path 0.1) over 90k iterations of a global batch of 16 (8 GPUs x
# 2; ViTDet trains 100 epochs at batch 64 and reaches 51.6 box / 45.9 mask AP with MAE's ViT-B and window attention,
# which this plain-attention backbone does not have). Box and mask AP through pycocotools. Start from any pre-trained
# model: tools/dist_train.sh CONFIG 8 --load-from <...>. Needs COCO under data/ (README, "COCO 2017"); not run in CI.
_base_ = [
    '../_base_/models/vit-base-p16_224px.py',
    '../_base_/datasets/real_4task_224px.py',
    '../_base_/schedules/adamw_warmup-cosine_100k.py',
    '../_base_/default_runtime.py',
]
_normalize = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
model = dict(backbone=dict(img_size=1024, drop_path_rate=0.1, grad_checkpointing=True))
tasks = dict(
    inst=dict(
        type='instance_segmentation',
        head=dict(type='MaskRCNNHead', num_classes=80,
                  neck=dict(type='SimpleFeaturePyramid', out_channels=256, scale_factors=(4.0, 2.0, 1.0, 0.5))),
        train_dataset=dict(type='CocoDetectionDataset', img_dir='data/coco/train2017',
                           ann_file='data/coco/annotations/instances_train2017.json',
                           pipeline=[dict(type='RandomHorizontalFlip'),
                                     dict(type='ScaleJitter', target_size=(1024, 1024), scale_range=(0.1, 2.0),
                                          antialias=True),
                                     dict(type='RandomCrop', size=(1024, 1024), pad_if_needed=True),
                                     dict(type='SanitizeBoundingBoxes')] + _normalize),
        val_dataset=dict(type='CocoDetectionDataset', img_dir='data/coco/val2017',
                         ann_file='data/coco/annotations/instances_val2017.json',
                         pipeline=[dict(type='Resize', size=(1024, 1024), antialias=True)] + _normalize),
        batch_size=2, val_batch_size=4, num_workers=4, metric=dict(type='COCOInstanceSegmentationMetric')),
)
optim_wrapper = dict(optimizer=dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1), clip_grad=None,
                     paramwise_cfg=dict(layer_decay_rate=0.7))
auto_scale_lr = dict(base_batch_size=16, enable=True)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=250),
    dict(type='CosineAnnealingLR', eta_min_ratio=0.01, by_epoch=False, begin=250, end=90000),
]
train_cfg = dict(max_iters=90000, val_interval=10000, val_at_start=False)
checkpoint_cfg = dict(interval=10000, max_keep=3)
