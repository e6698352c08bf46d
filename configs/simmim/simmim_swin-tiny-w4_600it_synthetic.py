# SimMIM on a Swin: masked squares of 16 px replaced by a mask token, one-layer pixel head, L1 on masked pixels;
# the embedded data's classification images, unlabeled, with MAE's augmentation and the 600-iteration schedule.
_base_ = [
    '../_base_/models/swin-tiny-w4_64px.py',
    '../_base_/datasets/synthetic_mae_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
synthetic_data = dict(root='data/synthetic', seed=0, num_train=2000, num_val=200, image_size=64, num_classes=6)
tasks = dict(simmim={{_base_._simmim_task}})
