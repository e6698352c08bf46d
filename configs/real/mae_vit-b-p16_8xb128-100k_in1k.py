# MAE alone on ImageNet-1k images, ViT-B/16 at 224 px, 100k iterations, bf16 autocast. Scale: 8 GPUs x 128 images
# (8xb128, a global batch of 1024: auto_scale_lr's base). Needs the datasets under data/ (layout in
# configs/_base_/datasets/real_4task_224px.py) and GPUs: launch with torchrun. Not run in CI; no measured numbers.
_base_ = [
    '../_base_/models/vit-base-p16_224px.py',
    '../_base_/datasets/real_4task_224px.py',
    '../_base_/schedules/adamw_warmup-cosine_100k.py',
    '../_base_/default_runtime.py',
]
tasks = dict(mae={{_base_._imagenet_mae_task}})
auto_scale_lr = dict(base_batch_size=1024)
checkpoint_cfg = dict(interval=5000, max_keep=3)
