"""Loaders of the real formats (and of unlabeled images); importing this package registers them in DATASETS."""
from mtvision.data.datasets.coco import CocoDetectionDataset, CocoMultiLabelDataset
from mtvision.data.datasets.depth import DepthDataset
from mtvision.data.datasets.imagefolder import ImageFolderDataset, read_image
from mtvision.data.datasets.multitarget import DenseMultiTaskDataset, MultiLabelImageList
from mtvision.data.datasets.segmentation import SegmentationDataset
from mtvision.data.datasets.skipping import SkipBadSamples
from mtvision.data.datasets.unlabeled import ImagesOf, UnlabeledImageFolder

__all__ = ['CocoDetectionDataset', 'CocoMultiLabelDataset', 'DenseMultiTaskDataset', 'DepthDataset',
           'ImageFolderDataset', 'ImagesOf', 'MultiLabelImageList', 'SegmentationDataset', 'SkipBadSamples',
           'UnlabeledImageFolder', 'read_image']
