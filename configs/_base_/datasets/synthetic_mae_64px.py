# Masked image modeling on the embedded synthetic data: the images of the classification set, unlabeled.
# (Names are prefixed so this file combines with synthetic_4task_64px.py as a second base.)
_mae_root = 'data/synthetic/classification'
_mae_normalize = [dict(type='ToFloat'),
                  dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
_mae_task = dict(
    type='mae',
    head=dict(type='MAEHead', mask_ratio=0.75, decoder_dim=64, decoder_depth=2, decoder_heads=4),
    # MAE's augmentation: a resized crop and a flip, nothing photometric
    train_dataset=dict(type='UnlabeledImageFolder', data_root=_mae_root + '/train',
                       pipeline=[dict(type='RandomResizedCrop', size=64, scale=(0.2, 1.0), antialias=True),
                                 dict(type='RandomHorizontalFlip')] + _mae_normalize),
    val_dataset=dict(type='UnlabeledImageFolder', data_root=_mae_root + '/val',
                     pipeline=[dict(type='Resize', size=(64, 64), antialias=True)] + _mae_normalize),
    batch_size=64, val_batch_size=100, loss_weight=1.0,
    metric=dict(type='ReconstructionMetric'))
# the same task for a Swin backbone: SimMIM's mask token and one-layer pixel head (SimMIM's mask ratio)
_simmim_task = dict(_mae_task, head=dict(type='SimMIMHead', mask_ratio=0.6))
