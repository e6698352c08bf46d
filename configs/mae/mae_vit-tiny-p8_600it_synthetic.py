# MAE alone on the embedded data, the quick start's backbone and schedule: the self-supervised baseline that
# the probes compare with random init and with the supervised and mixed runs.
_base_ = [
    '../_base_/models/vit-tiny-p8_64px.py',
    '../_base_/datasets/synthetic_mae_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
synthetic_data = dict(root='data/synthetic', seed=0, num_train=2000, num_val=200, image_size=64, num_classes=6)
tasks = dict(mae={{_base_._mae_task}})
