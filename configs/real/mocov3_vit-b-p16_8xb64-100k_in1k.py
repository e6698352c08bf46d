# MoCo v3 alone on ImageNet-1k images, ViT-B/16 at 224 px, 100k iterations, bf16 autocast. Scale: 8 GPUs x 64 images
# of two views each (8xb64, a global batch of 512: auto_scale_lr's base). Needs the datasets under data/ (layout in
# configs/_base_/datasets/real_4task_224px.py) and GPUs: launch with torchrun. Not run in CI; no measured numbers.
_base_ = [
    '../_base_/models/vit-base-p16_224px.py',
    '../_base_/datasets/real_4task_224px.py',
    '../_base_/schedules/adamw_warmup-cosine_100k.py',
    '../_base_/default_runtime.py',
]
tasks = dict(contrastive={{_base_._imagenet_contrastive_task}})
checkpoint_cfg = dict(interval=5000, max_keep=3)
