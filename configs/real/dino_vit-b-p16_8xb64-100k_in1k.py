# DINO + iBOT (DINOv2's objective) alone on ImageNet-1k images, ViT-B/16, 100k iterations (40 epochs at a global
# batch of 512), bf16 autocast. Scale: 8 GPUs x 64 images of two 224 px global and eight 96 px local crops each
# (8xb64). Settings from DINO (Caron et al. 2021) and DINOv2 (Oquab et al. 2023): 65536 prototypes, teacher
# temperature 0.04 -> 0.07 over 30 epochs, teacher momentum 0.996 -> 1, centre momentum 0.9, prototypes frozen
# for the first epoch, iBOT on half the global crops with 10-50% of their patches masked, lr 5e-4 per 256 images,
# weight decay 0.04 (DINO raises it to 0.4 by cosine; a constant here), gradient clipping at 3. Needs ImageNet
# under data/imagenet/train (layout in configs/_base_/datasets/real_4task_224px.py) and GPUs: launch with
# torchrun. Not run in CI; no measured numbers.
_base_ = [
    '../_base_/models/vit-base-p16_224px.py',
    '../_base_/schedules/adamw_warmup-cosine_100k.py',
    '../_base_/default_runtime.py',
]
model = dict(backbone=dict(dynamic_img_size=True))  # the 96 px local crops: the position table is resampled
optim_wrapper = dict(optimizer=dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.04))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=25000),  # DINO: 10 warm-up epochs
    dict(type='CosineAnnealingLR', eta_min_ratio=0.002, by_epoch=False, begin=25000, end=100000),
]

_normalize = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
_blur = dict(type='GaussianBlur', kernel_size=23, sigma=(0.1, 2.0))
_colour = [dict(type='RandomHorizontalFlip'),
           dict(type='RandomApply', p=0.8, transforms=[
               dict(type='ColorJitter', brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)]),
           dict(type='RandomGrayscale', p=0.2)]
_global_crop = [dict(type='RandomResizedCrop', size=224, scale=(0.32, 1.0), antialias=True)] + _colour
# DINO's asymmetric pair: the first global crop always blurred, the second blurred 10% of the time and solarized 20%;
# local crops blurred half the time
_crops = dict(
    type='MultiCrop',
    global_pipelines=[_global_crop + [_blur] + _normalize,
                      _global_crop + [dict(type='RandomApply', p=0.1, transforms=[_blur]),
                                      dict(type='RandomSolarize', threshold=128, p=0.2)] + _normalize],
    local_pipeline=[dict(type='RandomResizedCrop', size=96, scale=(0.05, 0.32), antialias=True)] + _colour
    + [dict(type='RandomApply', p=0.5, transforms=[_blur])] + _normalize,
    num_local_crops=8)
tasks = dict(dino=dict(
    type='dino',
    head=dict(type='DINOHead', feature='cls', out_dim=65536, hidden_dim=2048, bottleneck_dim=256,
              student_temperature=0.1, teacher_temperature=0.07, warmup_teacher_temperature=0.04,
              warmup_teacher_temperature_iters=75000, momentum=0.996, freeze_last_layer_iters=2500,
              ibot=dict(loss_weight=1.0, mask_probability=0.5, mask_ratio=(0.1, 0.5))),
    train_dataset=dict(type='UnlabeledImageFolder', data_root='data/imagenet/train', pipeline=[_crops]),
    batch_size=64, num_workers=10))
checkpoint_cfg = dict(interval=5000, max_keep=3)
