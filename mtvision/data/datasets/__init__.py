"""Loaders of the four real formats; importing this package registers them in DATASETS."""
from mtvision.data.datasets.coco import CocoDetectionDataset
from mtvision.data.datasets.depth import DepthDataset
from mtvision.data.datasets.imagefolder import ImageFolderDataset, read_image
from mtvision.data.datasets.segmentation import SegmentationDataset

__all__ = ['CocoDetectionDataset', 'DepthDataset', 'ImageFolderDataset', 'SegmentationDataset', 'read_image']
