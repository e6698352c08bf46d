# The synthetic shared-image layout (NYUv2-like): one set of multi-object scenes, each labelled for segmentation,
# depth, surface normals and the classes it shows (multi-label). `tools/make_synthetic.py --shared-images` writes it;
# `synthetic_data` below generates it on the first run. Flips negate the normals' x component, and every dense
# target follows the image through the same geometry.
# Two ways to train on it (configs/shared/): `_separate_tasks`, each task drawing its own batches, or
# `_grouped_tasks` + `_task_groups`, where seg, depth and normals draw one batch of images labelled for all three and
# share one backbone forward (the multi-label task keeps its own list file and batches).
_data_root = 'data/synthetic_shared'
_size = 64
_normalize = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
_train_geometry = [dict(type='RandomHorizontalFlip')]
_val_geometry = [dict(type='Resize', size=(_size, _size), antialias=True)]
_num_classes = 6
_classes = ('circle', 'square', 'triangle', 'star', 'hexagon', 'cross')


synthetic_data = dict(root=_data_root, seed=0, num_train=2000, num_val=200, image_size=_size,
                      num_classes=_num_classes, shared_images=True)

# what each task is, apart from where its training batches come from
_tasks = dict(
    seg=dict(
        type='segmentation',
        head=dict(type='SemanticFPNHead', num_classes=_num_classes + 1),
        val_dataset=dict(type='SegmentationDataset', img_dir=f'{_data_root}/images/val',
                         ann_dir=f'{_data_root}/segmentation/annotations/val', num_classes=_num_classes + 1,
                         pipeline=_val_geometry + _normalize),
        val_batch_size=100, loss_weight=1.0,
        metric=dict(type='SegmentationMetric', num_classes=_num_classes + 1)),
    depth=dict(
        type='depth',
        head=dict(type='DepthHead', max_depth=20.0),
        val_dataset=dict(type='DepthDataset', img_dir=f'{_data_root}/images/val',
                         depth_dir=f'{_data_root}/depth/val/depth', pipeline=_val_geometry + _normalize),
        val_batch_size=100, loss_weight=1.0,
        metric=dict(type='DepthMetric', max_depth=20.0)),
    normals=dict(
        type='normals',
        head=dict(type='NormalsHead', loss='cosine'),
        val_dataset=dict(type='DenseMultiTaskDataset', img_dir=f'{_data_root}/images/val',
                         normal_dir=f'{_data_root}/normals/val', pipeline=_val_geometry + _normalize),
        val_batch_size=100, loss_weight=1.0,
        metric=dict(type='NormalsMetric')),
    tags=dict(
        type='multilabel',
        head=dict(type='MultiLabelClassificationHead', num_classes=_num_classes, feature='cls', loss='asymmetric'),
        val_dataset=dict(type='MultiLabelImageList', data_root=f'{_data_root}/images/val',
                         ann_file=f'{_data_root}/multilabel/val.txt', classes=_classes,
                         pipeline=_val_geometry + _normalize),
        val_batch_size=100, loss_weight=1.0,
        metric=dict(type='MultiLabelMetric')),
)
_train_pipeline = _train_geometry + _normalize
_train_datasets = dict(
    seg=dict(type='SegmentationDataset', img_dir=f'{_data_root}/images/train',
             ann_dir=f'{_data_root}/segmentation/annotations/train', num_classes=_num_classes + 1,
             pipeline=_train_pipeline),
    depth=dict(type='DepthDataset', img_dir=f'{_data_root}/images/train', depth_dir=f'{_data_root}/depth/train/depth',
               pipeline=_train_pipeline),
    normals=dict(type='DenseMultiTaskDataset', img_dir=f'{_data_root}/images/train',
                 normal_dir=f'{_data_root}/normals/train', pipeline=_train_pipeline),
    tags=dict(type='MultiLabelImageList', data_root=f'{_data_root}/images/train',
              ann_file=f'{_data_root}/multilabel/train.txt', classes=_classes, pipeline=_train_pipeline),
)
_batch_size = 16
_separate_tasks = {name: dict(task, train_dataset=_train_datasets[name], batch_size=_batch_size)
                   for name, task in _tasks.items()}
_task_groups = dict(scenes=dict(
    train_dataset=dict(type='DenseMultiTaskDataset', img_dir=f'{_data_root}/images/train',
                       seg_dir=f'{_data_root}/segmentation/annotations/train',
                       depth_dir=f'{_data_root}/depth/train/depth', normal_dir=f'{_data_root}/normals/train',
                       num_classes=_num_classes + 1, pipeline=_train_pipeline),
    batch_size=_batch_size))
_grouped_tasks = {name: dict(task, group='scenes') if name != 'tags' else _separate_tasks[name]
                  for name, task in _tasks.items()}
