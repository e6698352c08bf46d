# The four supervised tasks: ImageNet classification, COCO detection (FCOS), ADE20K segmentation (UperNet), NYUv2 depth,
# ViT-B/16 at 224 px, 100k iterations, bf16 autocast. Scale: 8 GPUs x 64 classification images (8xb64, a global batch
# of 512: auto_scale_lr's base); the dense tasks take 32 images per GPU. Each step trains one task, drawn with
# p_t ~ n_t^(1/2) (the temperature sampling of multilingual/multi-task training): over 100k steps ImageNet gets
# ~27 epochs, COCO ~45, ADE20K ~109, NYUv2 ~551 (every task every step would repeat NYUv2's 795 images 32,000 times).
# Needs the datasets under data/ (layout in configs/_base_/datasets/real_4task_224px.py) and GPUs: launch with
# torchrun. Not run in CI; no measured numbers.
_base_ = [
    '../_base_/models/vit-base-p16_224px.py',
    '../_base_/datasets/real_4task_224px.py',
    '../_base_/schedules/adamw_warmup-cosine_100k.py',
    '../_base_/default_runtime.py',
]
tasks = dict(cls={{_base_._imagenet_task}}, det={{_base_._coco_task}}, seg={{_base_._ade20k_task}},
             depth={{_base_._nyuv2_task}})
mixer = dict(strategy='temperature', temperature=2.0, tasks_per_step=1)
auto_scale_lr = dict(task='cls')  # base_batch_size=512 counts classification images
checkpoint_cfg = dict(interval=5000, max_keep=3)
