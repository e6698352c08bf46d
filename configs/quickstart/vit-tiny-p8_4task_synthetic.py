# The quick start: a tiny ViT trained jointly on classification, detection, segmentation and depth of the
# embedded synthetic data, fp32 on CPU, in a few minutes on 2 cores. The table printed at the end compares each
# task's metric before training (val_at_start) with the trained model.
_base_ = [
    '../_base_/models/vit-tiny-p8_64px.py',
    '../_base_/datasets/synthetic_4task_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
