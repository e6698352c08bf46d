# The full mixture: MAE + MoCo v3 + the four supervised tasks, ViT-B/16 at 224 px, 100k iterations, bf16 autocast.
# Scale: 8 GPUs x 64 classification images (8xb64, a global batch of 512: auto_scale_lr's base); MAE takes 128 images
# per GPU, MoCo v3 64, the dense tasks 32. Each step trains one task, drawn with p_t ~ n_t^(1/2) (the three ImageNet
# tasks 29% each): over 100k steps MAE gets ~23 ImageNet epochs, MoCo v3 and classification ~12 each, COCO ~19,
# ADE20K ~46, NYUv2 ~230. Needs the datasets under data/ (layout in configs/_base_/datasets/real_4task_224px.py) and
# GPUs: launch with torchrun. Not run in CI; no measured numbers.
_base_ = [
    '../_base_/models/vit-base-p16_224px.py',
    '../_base_/datasets/real_4task_224px.py',
    '../_base_/schedules/adamw_warmup-cosine_100k.py',
    '../_base_/default_runtime.py',
]
tasks = dict(mae={{_base_._imagenet_mae_task}}, contrastive={{_base_._imagenet_contrastive_task}},
             cls={{_base_._imagenet_task}}, det={{_base_._coco_task}}, seg={{_base_._ade20k_task}},
             depth={{_base_._nyuv2_task}})
mixer = dict(strategy='temperature', temperature=2.0, tasks_per_step=1)
auto_scale_lr = dict(task='cls')  # base_batch_size=512 counts classification images
checkpoint_cfg = dict(interval=5000, max_keep=3)
