"""Data: synthetic scenes, loaders of the real formats, joint transforms and per-task collate functions.

Importing this package registers the datasets in DATASETS and the transforms in TRANSFORMS.
"""
from mtvision.data.collate import COLLATE_FNS
from mtvision.data.datasets import (CocoDetectionDataset, DepthDataset, ImageFolderDataset, ImagesOf,
                                    SegmentationDataset, SkipBadSamples, UnlabeledImageFolder)
from mtvision.data.errors import DataError
from mtvision.data.synthetic import ensure_synthetic, generate_synthetic, render_scene
from mtvision.data.transforms import build_pipeline

__all__ = ['COLLATE_FNS', 'CocoDetectionDataset', 'DataError', 'DepthDataset', 'ImageFolderDataset', 'ImagesOf',
           'SegmentationDataset', 'SkipBadSamples', 'UnlabeledImageFolder', 'build_pipeline', 'ensure_synthetic',
           'generate_synthetic', 'render_scene']
