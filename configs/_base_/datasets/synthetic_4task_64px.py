# The embedded synthetic data: four tasks on different images, in the formats of ImageNet, COCO, ADE20K and
# NYUv2. tools/train.py generates it under _data_root on first use (synthetic_data below).
_data_root = 'data/synthetic'
_size = 64
_normalize = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
_train_geometry = [dict(type='RandomResizedCrop', size=_size, scale=(0.5, 1.0), antialias=True),
                   dict(type='RandomHorizontalFlip')]
_val_geometry = [dict(type='Resize', size=(_size, _size), antialias=True)]
_num_classes = 6
# the generator's class order, so a class has the same index in every task (folders would sort by name)
_classes = ('circle', 'square', 'triangle', 'star', 'hexagon', 'cross')
# depth: flips only; a resized crop would change objects' apparent size but not their depth
_depth_train_geometry = [dict(type='RandomHorizontalFlip')]

synthetic_data = dict(root=_data_root, seed=0, num_train=2000, num_val=200, image_size=_size,
                      num_classes=_num_classes)

tasks = dict(
    cls=dict(
        type='classification',
        head=dict(type='ClassificationHead', num_classes=_num_classes, feature='cls'),
        train_dataset=dict(type='ImageFolderDataset', data_root=_data_root + '/classification/train',
                           classes=_classes, pipeline=_train_geometry + _normalize),
        val_dataset=dict(type='ImageFolderDataset', data_root=_data_root + '/classification/val',
                         classes=_classes, pipeline=_val_geometry + _normalize),
        batch_size=16, val_batch_size=100, loss_weight=1.0,
        metric=dict(type='Accuracy', topk=(1, 5))),
    det=dict(
        type='detection',
        head=dict(type='FCOSHead', num_classes=_num_classes),
        train_dataset=dict(type='CocoDetectionDataset', img_dir=_data_root + '/detection/images/train',
                           ann_file=_data_root + '/detection/annotations/instances_train.json',
                           pipeline=_train_geometry + [dict(type='SanitizeBoundingBoxes')] + _normalize),
        val_dataset=dict(type='CocoDetectionDataset', img_dir=_data_root + '/detection/images/val',
                         ann_file=_data_root + '/detection/annotations/instances_val.json',
                         pipeline=_val_geometry + _normalize),
        batch_size=16, val_batch_size=100, loss_weight=1.0,
        metric=dict(type='COCODetectionMetric')),
    seg=dict(
        type='segmentation',
        head=dict(type='SemanticFPNHead', num_classes=_num_classes + 1),
        train_dataset=dict(type='SegmentationDataset', img_dir=_data_root + '/segmentation/images/train',
                           ann_dir=_data_root + '/segmentation/annotations/train', num_classes=_num_classes + 1,
                           pipeline=_train_geometry + _normalize),
        val_dataset=dict(type='SegmentationDataset', img_dir=_data_root + '/segmentation/images/val',
                         ann_dir=_data_root + '/segmentation/annotations/val', num_classes=_num_classes + 1,
                         pipeline=_val_geometry + _normalize),
        batch_size=16, val_batch_size=100, loss_weight=1.0,
        metric=dict(type='SegmentationMetric', num_classes=_num_classes + 1)),
    depth=dict(
        type='depth',
        head=dict(type='DepthHead', max_depth=20.0),
        train_dataset=dict(type='DepthDataset', img_dir=_data_root + '/depth/train/rgb',
                           depth_dir=_data_root + '/depth/train/depth', pipeline=_depth_train_geometry + _normalize),
        val_dataset=dict(type='DepthDataset', img_dir=_data_root + '/depth/val/rgb',
                         depth_dir=_data_root + '/depth/val/depth', pipeline=_val_geometry + _normalize),
        batch_size=16, val_batch_size=100, loss_weight=1.0,
        metric=dict(type='DepthMetric', max_depth=20.0)),
)
