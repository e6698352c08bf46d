# Four tasks on one set of images (the synthetic shared-image layout, NYUv2-like): segmentation, depth, surface
# normals and multi-label classification, the quick start's backbone and schedule. Each task draws its own batches
# and runs its own backbone forward; the grouped config beside this one shares them.
_base_ = [
    '../_base_/models/vit-tiny-p8_64px.py',
    '../_base_/datasets/synthetic_shared_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
tasks = {{_base_._separate_tasks}}
