# The shared-image tasks with seg, depth and normals as one task group: each step draws one batch of images labelled
# for all three, runs the backbone once and every head reads its output (losses stay per task, so an aggregator sees
# three task losses of one shared representation); the multi-label task draws its own batches beside the group.
_base_ = [
    '../_base_/models/vit-tiny-p8_64px.py',
    '../_base_/datasets/synthetic_shared_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
task_groups = {{_base_._task_groups}}
tasks = {{_base_._grouped_tasks}}
