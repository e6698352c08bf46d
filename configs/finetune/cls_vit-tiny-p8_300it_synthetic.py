# Fine-tuning a pre-trained backbone on the embedded data's classification task with MAE's ImageNet fine-tuning recipe
# at the quick start's size: layer-wise lr decay 0.65, drop path 0.1, RandAugment (2 ops, magnitude 9), MixUp 0.8 /
# CutMix 1.0, random erasing 0.25, label smoothing 0.1, AdamW (weight decay 0.05) with warm-up and cosine, 300
# iterations (a few minutes on 2 CPU cores). Start it from any pre-trained model, e.g. the quick start's run:
#   python tools/train.py configs/finetune/cls_vit-tiny-p8_300it_synthetic.py \
#       --load-from work_dirs/vit-tiny-p8_4task_synthetic
# (a work dir, checkpoint, zoo name, URL or timm:<name>@<file>: the backbone loads, and the cls head too when the
# pre-trained model has one that fits).
_base_ = [
    '../_base_/models/vit-tiny-p8_64px.py',
    '../_base_/datasets/synthetic_4task_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
_data_root = 'data/synthetic'
_classes = ('circle', 'square', 'triangle', 'star', 'hexagon', 'cross')
_normalize = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
model = dict(backbone=dict(drop_path_rate=0.1))
tasks = dict(
    _delete_=True,
    cls=dict(
        type='classification',
        head=dict(type='ClassificationHead', num_classes=6, feature='avg', label_smoothing=0.1),
        train_dataset=dict(type='ImageFolderDataset', data_root=_data_root + '/classification/train',
                           classes=_classes,
                           pipeline=[dict(type='RandomResizedCrop', size=64, scale=(0.5, 1.0), antialias=True),
                                     dict(type='RandomHorizontalFlip'),
                                     dict(type='RandAugment', num_ops=2, magnitude=9)] + _normalize),
        val_dataset=dict(type='ImageFolderDataset', data_root=_data_root + '/classification/val', classes=_classes,
                         pipeline=[dict(type='Resize', size=(64, 64), antialias=True)] + _normalize),
        batch_augments=[dict(type='RandomErasing', prob=0.25), dict(type='MixUp', alpha=0.8),
                        dict(type='CutMix', alpha=1.0)],
        batch_size=32, val_batch_size=100, metric=dict(type='Accuracy', topk=(1, 5))),
)
optim_wrapper = dict(optimizer=dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
                     paramwise_cfg=dict(layer_decay_rate=0.65))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', eta_min_ratio=0.01, by_epoch=False, begin=30, end=300),
]
train_cfg = dict(max_iters=300, val_interval=300, val_at_start=True)
