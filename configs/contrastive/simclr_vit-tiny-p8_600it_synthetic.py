# SimCLR alone on the embedded data, the quick start's backbone and schedule: the contrastive baseline that the
# probes compare with random init, MAE and the full mixture.
_base_ = [
    '../_base_/models/vit-tiny-p8_64px.py',
    '../_base_/datasets/synthetic_contrastive_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
synthetic_data = dict(root='data/synthetic', seed=0, num_train=2000, num_val=200, image_size=64, num_classes=6)
tasks = dict(contrastive={{_base_._contrastive_task}})
