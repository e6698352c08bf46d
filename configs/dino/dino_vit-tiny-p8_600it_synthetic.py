# DINO + iBOT (DINOv2's objective) alone on the embedded data, the quick start's backbone and 600-iteration
# schedule: two 64 px global crops and four 32 px local crops of each classification-set image, labels unused.
# A self-supervised baseline beside SimCLR and MAE for the frozen-feature probes.
_base_ = [
    '../_base_/models/vit-tiny-p8_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
synthetic_data = dict(root='data/synthetic', seed=0, num_train=2000, num_val=200, image_size=64, num_classes=6)
# local crops are 32 px: timm's ViT resamples its position table to each input size
model = dict(backbone=dict(dynamic_img_size=True))

_root = 'data/synthetic/classification'
_normalize = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
# DINO's augmentations scaled to 64 px (no blur: at this size it erases the shapes); the second global crop is
# sometimes solarized, as in DINO
_colour = [dict(type='RandomHorizontalFlip'),
           dict(type='RandomApply', p=0.8, transforms=[
               dict(type='ColorJitter', brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)]),
           dict(type='RandomGrayscale', p=0.2)]
_global_crop = [dict(type='RandomResizedCrop', size=64, scale=(0.32, 1.0), antialias=True)] + _colour
_crops = dict(
    type='MultiCrop',
    global_pipelines=[_global_crop + _normalize,
                      _global_crop + [dict(type='RandomSolarize', threshold=128, p=0.2)] + _normalize],
    local_pipeline=[dict(type='RandomResizedCrop', size=32, scale=(0.05, 0.32), antialias=True)] + _colour
    + _normalize,
    num_local_crops=4)
tasks = dict(dino=dict(
    type='dino',
    head=dict(type='DINOHead', feature='cls', out_dim=1024, hidden_dim=512, bottleneck_dim=128,
              student_temperature=0.1, teacher_temperature=0.07, warmup_teacher_temperature=0.04,
              warmup_teacher_temperature_iters=100, momentum=0.99, freeze_last_layer_iters=50,
              ibot=dict(loss_weight=1.0, mask_probability=0.5, mask_ratio=(0.1, 0.5))),
    train_dataset=dict(type='UnlabeledImageFolder', data_root=_root + '/train', pipeline=[_crops]),
    # two global crops of each validation image: can a crop find the image's other crop?
    val_dataset=dict(type='UnlabeledImageFolder', data_root=_root + '/val',
                     pipeline=[dict(type='MultiCrop', global_pipeline=_global_crop + _normalize)]),
    batch_size=32, val_batch_size=100, loss_weight=1.0,
    metric=dict(type='ViewRetrieval')))
