# Instance segmentation on the embedded data (the detection set's instance masks) with Mask R-CNN, fine-tuned from a
# pre-trained run: layer-wise lr decay 0.7 and drop path 0.1 (ViTDet's settings), 300 iterations, e.g.
#   python tools/train.py configs/finetune/mask-rcnn_vit-tiny-p8_300it_synthetic.py \
#       --load-from work_dirs/vit-tiny-p8_4task_synthetic
_base_ = [
    '../_base_/models/vit-tiny-p8_64px.py',
    '../_base_/datasets/synthetic_instance_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
synthetic_data = dict(root='data/synthetic', seed=0, num_train=2000, num_val=200, image_size=64, num_classes=6)
model = dict(backbone=dict(drop_path_rate=0.1))
tasks = dict(inst={{_base_._instance_segmentation_task}})
optim_wrapper = dict(optimizer=dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1),
                     paramwise_cfg=dict(layer_decay_rate=0.7))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', eta_min_ratio=0.01, by_epoch=False, begin=30, end=300),
]
train_cfg = dict(max_iters=300, val_interval=300, val_at_start=False)
