# The four public datasets in their own formats, every task at 224 px (the ViT's position table fits every task;
# dense fine-tuning at full resolution is a separate step). Expected layout under data/ (symlinks are fine):
#   imagenet/train/<wnid>/*.JPEG, imagenet/val/ILSVRC2012_val_*.JPEG, imagenet/meta/val.txt  (mmpretrain's layout; the
#     Kaggle download instead: README, "Real datasets")
#   coco/{train2017,val2017}/*.jpg, coco/annotations/instances_{train,val}2017.json
#   ade20k/images/{training,validation}/*.jpg, ade20k/annotations/{training,validation}/*.png  (ADEChallengeData2016)
#   nyuv2/{train,val}/rgb/*.png, nyuv2/{train,val}/depth/*.png  (tools/prepare_nyuv2.py; uint16 mm, 0 = invalid)
#   for the NYUv2 task group also nyuv2/{train,val}/labels/*.png (--class-mapping to 40 classes) and
#   nyuv2/{train,val}/normals/*.png (RGB, n = rgb / 255 * 2 - 1, (0, 0, 0) = invalid; from Eigen & Fergus's release)
# Names are prefixed with _ so recipes pick the tasks they need: tasks = dict(cls={{_base_._imagenet_task}}, ...).
_size = 224
# Dense heads at the widths of the papers: ViTDet's simple feature pyramid (Li et al., 2022) with 256 channels at
# strides 4-32 for a patch-16 ViT, FCOS with 4-conv GroupNorm towers (Tian et al., 2019), UperNet with 512 channels
# (mmsegmentation's ADE20K configs for BEiT, MAE and Swin), and Panoptic FPN's 128-channel semantic branch for depth.
_neck = dict(type='SimpleFeaturePyramid', out_channels=256, scale_factors=(4.0, 2.0, 1.0, 0.5))
_normalize = [dict(type='ToFloat'), dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]
_val_geometry = [dict(type='Resize', size=(_size, _size), antialias=True)]
_imagenet_train = [dict(type='RandomResizedCrop', size=_size, scale=(0.08, 1.0), antialias=True),
                   dict(type='RandomHorizontalFlip'),
                   dict(type='ColorJitter', brightness=0.4, contrast=0.4, saturation=0.4)] + _normalize
# timm's evaluation: short side to floor(224 / 0.875) = 256, bicubic, centre crop 224
_imagenet_val = [dict(type='ResizeCenterCrop', size=_size, crop_pct=0.875, interpolation='bicubic')] + _normalize

_imagenet_task = dict(
    type='classification',
    head=dict(type='ClassificationHead', num_classes=1000, feature='cls', label_smoothing=0.1),
    train_dataset=dict(type='ImageFolderDataset', data_root='data/imagenet/train', pipeline=_imagenet_train),
    val_dataset=dict(type='ImageFolderDataset', data_root='data/imagenet/val', ann_file='data/imagenet/meta/val.txt',
                     classes='data/imagenet/train', pipeline=_imagenet_val),
    batch_size=64, val_batch_size=128, num_workers=8, metric=dict(type='Accuracy', topk=(1, 5)))
_coco_task = dict(
    type='detection',
    head=dict(type='FCOSHead', num_classes=80, num_convs=4, neck=_neck),
    train_dataset=dict(type='CocoDetectionDataset', img_dir='data/coco/train2017',
                       ann_file='data/coco/annotations/instances_train2017.json', with_masks=False,
                       pipeline=[dict(type='RandomResizedCrop', size=_size, scale=(0.3, 1.0), antialias=True),
                                 dict(type='RandomHorizontalFlip'), dict(type='SanitizeBoundingBoxes')] + _normalize),
    val_dataset=dict(type='CocoDetectionDataset', img_dir='data/coco/val2017',
                     ann_file='data/coco/annotations/instances_val2017.json', with_masks=False,
                     pipeline=_val_geometry + _normalize),
    batch_size=32, val_batch_size=64, num_workers=8, metric=dict(type='COCODetectionMetric'))
_ade20k_task = dict(
    type='segmentation',
    head=dict(type='UPerHead', num_classes=150, channels=512, pool_scales=(1, 2, 3, 6), neck=_neck),
    train_dataset=dict(type='SegmentationDataset', img_dir='data/ade20k/images/training',
                       ann_dir='data/ade20k/annotations/training', num_classes=150, reduce_zero_label=True,
                       pipeline=[dict(type='RandomResizedCrop', size=_size, scale=(0.3, 1.0), antialias=True),
                                 dict(type='RandomHorizontalFlip'),
                                 dict(type='ColorJitter', brightness=0.3, contrast=0.3, saturation=0.3)] + _normalize),
    val_dataset=dict(type='SegmentationDataset', img_dir='data/ade20k/images/validation',
                     ann_dir='data/ade20k/annotations/validation', num_classes=150, reduce_zero_label=True,
                     pipeline=_val_geometry + _normalize),
    batch_size=32, val_batch_size=64, num_workers=8, metric=dict(type='SegmentationMetric', num_classes=150))
_nyuv2_task = dict(
    type='depth',
    head=dict(type='DepthHead', max_depth=10.0, channels=128, neck=_neck),
    # scaling would change apparent sizes but not depths: crop at full resolution, then shrink the whole view
    train_dataset=dict(type='DepthDataset', img_dir='data/nyuv2/train/rgb', depth_dir='data/nyuv2/train/depth',
                       img_suffix='.png',
                       pipeline=[dict(type='RandomCrop', size=(416, 544)), dict(type='RandomHorizontalFlip'),
                                 dict(type='Resize', size=(_size, _size), antialias=True)] + _normalize),
    val_dataset=dict(type='DepthDataset', img_dir='data/nyuv2/val/rgb', depth_dir='data/nyuv2/val/depth',
                     img_suffix='.png', pipeline=_val_geometry + _normalize),
    batch_size=32, val_batch_size=64, num_workers=8, metric=dict(type='DepthMetric', max_depth=10.0, crop='eigen'))
# NYUv2 as one task group (segmentation into 40 classes, depth, normals of the same frames): one batch of frames
# labelled for all three, one backbone forward; each task keeps its validation set (README, "NYUv2")
_nyuv2_group = dict(
    train_dataset=dict(type='DenseMultiTaskDataset', img_dir='data/nyuv2/train/rgb', img_suffix='.png',
                       seg_dir='data/nyuv2/train/labels', num_classes=40, reduce_zero_label=True,
                       depth_dir='data/nyuv2/train/depth', normal_dir='data/nyuv2/train/normals',
                       pipeline=[dict(type='RandomCrop', size=(416, 544)), dict(type='RandomHorizontalFlip'),
                                 dict(type='Resize', size=(_size, _size), antialias=True)] + _normalize),
    batch_size=32, num_workers=8)
_nyuv2_group_tasks = dict(
    nyu_seg=dict(
        type='segmentation', group='nyuv2', head=dict(type='UPerHead', num_classes=40, channels=512,
                                                      pool_scales=(1, 2, 3, 6), neck=_neck),
        val_dataset=dict(type='SegmentationDataset', img_dir='data/nyuv2/val/rgb', img_suffix='.png',
                         ann_dir='data/nyuv2/val/labels', num_classes=40, reduce_zero_label=True,
                         pipeline=_val_geometry + _normalize),
        val_batch_size=64, metric=dict(type='SegmentationMetric', num_classes=40)),
    nyu_depth=dict(
        type='depth', group='nyuv2', head=dict(type='DepthHead', max_depth=10.0, channels=128, neck=_neck),
        val_dataset=_nyuv2_task['val_dataset'], val_batch_size=64,
        metric=dict(type='DepthMetric', max_depth=10.0, crop='eigen')),
    nyu_normals=dict(
        type='normals', group='nyuv2', head=dict(type='NormalsHead', channels=128, neck=_neck),
        val_dataset=dict(type='DenseMultiTaskDataset', img_dir='data/nyuv2/val/rgb', img_suffix='.png',
                         normal_dir='data/nyuv2/val/normals', pipeline=_val_geometry + _normalize),
        val_batch_size=64, metric=dict(type='NormalsMetric')),
)
# self-supervised tasks on ImageNet's training images (labels unused)
_imagenet_mae_task = dict(
    type='mae',
    head=dict(type='MAEHead', mask_ratio=0.75, decoder_dim=512, decoder_depth=8, decoder_heads=16,
              norm_pix_loss=True, grid_size=(14, 14)),
    train_dataset=dict(type='UnlabeledImageFolder', data_root='data/imagenet/train',
                       pipeline=[dict(type='RandomResizedCrop', size=_size, scale=(0.2, 1.0), antialias=True),
                                 dict(type='RandomHorizontalFlip')] + _normalize),
    batch_size=128, num_workers=8)

# MoCo v3's two asymmetric views (BYOL's recipe; facebookresearch/moco-v3, main_moco.py): colour jitter 80% of the
# time, grey 20%, blur always on the first view and 10% of the time on the second, solarize 20% on the second only
_blur = dict(type='GaussianBlur', kernel_size=23, sigma=(0.1, 2.0))
_moco_view = [dict(type='RandomResizedCrop', size=_size, scale=(0.08, 1.0), antialias=True),
              dict(type='RandomApply', p=0.8,
                   transforms=[dict(type='ColorJitter', brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)]),
              dict(type='RandomGrayscale', p=0.2)]
_moco_views = [_moco_view + [_blur, dict(type='RandomHorizontalFlip')] + _normalize,
               _moco_view + [dict(type='RandomApply', p=0.1, transforms=[_blur]),
                             dict(type='RandomSolarize', threshold=128, p=0.2),
                             dict(type='RandomHorizontalFlip')] + _normalize]
_imagenet_contrastive_task = dict(
    type='contrastive',
    head=dict(type='MoCoV3Head', feature='cls', hidden_dim=4096, out_dim=256, proj_layers=3, pred_layers=2,
              temperature=0.2, momentum=0.99),
    train_dataset=dict(type='UnlabeledImageFolder', data_root='data/imagenet/train', pipeline=[dict(
        type='MultiView', pipelines=_moco_views)]),
    batch_size=64, num_workers=8)
