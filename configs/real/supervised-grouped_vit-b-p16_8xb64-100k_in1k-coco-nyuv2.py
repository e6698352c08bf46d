# ImageNet classification and COCO detection beside NYUv2 as one task group (40-class segmentation, depth and
# normals of the same frames: one batch, one backbone forward for the three), ViT-B/16 at 224 px, 100k iterations,
# bf16. Every task every step; the group's three losses share one representation, so feature-level surgery
# (aggregator=dict(type='AlignedMTLUB')) sees their conflicts. Needs the datasets under data/ (layout in
# configs/_base_/datasets/real_4task_224px.py; the normals from Eigen & Fergus's release) and GPUs: launch with
# torchrun. Not run in CI; no measured numbers.
_base_ = [
    '../_base_/models/vit-base-p16_224px.py',
    '../_base_/datasets/real_4task_224px.py',
    '../_base_/schedules/adamw_warmup-cosine_100k.py',
    '../_base_/default_runtime.py',
]
task_groups = dict(nyuv2={{_base_._nyuv2_group}})
tasks = dict(cls={{_base_._imagenet_task}}, det={{_base_._coco_task}}, nyu_seg={{_base_._nyuv2_group_tasks.nyu_seg}},
             nyu_depth={{_base_._nyuv2_group_tasks.nyu_depth}}, nyu_normals={{_base_._nyuv2_group_tasks.nyu_normals}})
mixer = dict(strategy='all')
auto_scale_lr = dict(task='cls')  # base_batch_size=512 counts classification images
checkpoint_cfg = dict(interval=5000, max_keep=3)
