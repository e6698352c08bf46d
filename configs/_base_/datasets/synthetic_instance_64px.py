# Instance segmentation on the embedded synthetic data: the detection set's COCO instances with their masks.
# (Names are prefixed so this file combines with synthetic_4task_64px.py as a second base.)
_instance_root = 'data/synthetic/detection'
_instance_normalize = [dict(type='ToFloat'),
                       dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
_instance_segmentation_task = dict(
    type='instance_segmentation',
    head=dict(type='MaskRCNNHead', num_classes=6),
    # the detection task's augmentation; SanitizeBoundingBoxes drops each degenerate box's mask with it
    train_dataset=dict(type='CocoDetectionDataset', img_dir=_instance_root + '/images/train',
                       ann_file=_instance_root + '/annotations/instances_train.json',
                       pipeline=[dict(type='RandomResizedCrop', size=64, scale=(0.5, 1.0), antialias=True),
                                 dict(type='RandomHorizontalFlip'), dict(type='SanitizeBoundingBoxes')]
                       + _instance_normalize),
    val_dataset=dict(type='CocoDetectionDataset', img_dir=_instance_root + '/images/val',
                     ann_file=_instance_root + '/annotations/instances_val.json',
                     pipeline=[dict(type='Resize', size=(64, 64), antialias=True)] + _instance_normalize),
    batch_size=16, val_batch_size=100, loss_weight=1.0,
    metric=dict(type='COCOInstanceSegmentationMetric'))
