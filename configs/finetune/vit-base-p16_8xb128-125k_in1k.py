# ImageNet-1k fine-tuning of a pre-trained ViT-B/16 with MAE's recipe (He et al. 2022, Table 9; its
# main_finetune.py): 100 epochs of a global batch of 1024 (8 GPUs x 128) = 125k iterations, 5 warm-up epochs, AdamW
# (0.9, 0.999), weight decay 0.05, base lr 5e-4 per 256 images (2e-3 at 1024), layer-wise lr decay 0.65, drop path
# 0.1, RandAugment (torchvision's, 2 ops at magnitude 9: MAE uses timm's rand-m9-mstd0.5-inc1), MixUp 0.8, CutMix
# 1.0, random erasing 0.25, label smoothing 0.1, global average pooling, bf16. MAE reports 83.6 top-1 for its ViT-B.
# Start from any pre-trained model: tools/dist_train.sh CONFIG 8 --load-from <work dir | checkpoint | zoo name | URL |
# timm:<name>@<file>>. Needs ImageNet under data/ (configs/_base_/datasets/real_4task_224px.py); not run in CI.
_base_ = [
    '../_base_/models/vit-base-p16_224px.py',
    '../_base_/datasets/real_4task_224px.py',
    '../_base_/schedules/adamw_warmup-cosine_100k.py',
    '../_base_/default_runtime.py',
]
_normalize = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
model = dict(backbone=dict(drop_path_rate=0.1))
tasks = dict(
    cls=dict(
        type='classification',
        head=dict(type='ClassificationHead', num_classes=1000, feature='avg', label_smoothing=0.1),
        train_dataset=dict(type='ImageFolderDataset', data_root='data/imagenet/train',
                           pipeline=[dict(type='RandomResizedCrop', size=224, scale=(0.08, 1.0), antialias=True,
                                          interpolation='bicubic'),
                                     dict(type='RandomHorizontalFlip'),
                                     dict(type='RandAugment', num_ops=2, magnitude=9)] + _normalize),
        val_dataset=dict(type='ImageFolderDataset', data_root='data/imagenet/val',
                         ann_file='data/imagenet/meta/val.txt', classes='data/imagenet/train',
                         pipeline=[dict(type='ResizeCenterCrop', size=224, crop_pct=0.875, interpolation='bicubic')]
                         + _normalize),
        batch_augments=[dict(type='RandomErasing', prob=0.25), dict(type='MixUp', alpha=0.8),
                        dict(type='CutMix', alpha=1.0)],
        batch_size=128, val_batch_size=256, num_workers=10, metric=dict(type='Accuracy', topk=(1, 5))),
)
optim_wrapper = dict(optimizer=dict(lr=5e-4, betas=(0.9, 0.999), weight_decay=0.05), clip_grad=None,
                     paramwise_cfg=dict(layer_decay_rate=0.65))
auto_scale_lr = dict(base_batch_size=256, enable=True)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=6255),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=False, begin=6255, end=125115),
]
train_cfg = dict(max_iters=125115, val_interval=6255, val_at_start=False)
checkpoint_cfg = dict(interval=6255, max_keep=3)
