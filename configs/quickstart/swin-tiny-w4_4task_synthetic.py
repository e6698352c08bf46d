# The quick start on a tiny Swin: four maps (strides 4 to 32) feed the dense heads' feature pyramids; Swin has
# no class token, so classification reads the mean token.
_base_ = [
    '../_base_/models/swin-tiny-w4_64px.py',
    '../_base_/datasets/synthetic_4task_64px.py',
    '../_base_/schedules/adamw_warmup-cosine.py',
    '../_base_/default_runtime.py',
]
tasks = dict(cls=dict(head=dict(feature='avg')))
