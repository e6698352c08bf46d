"""NYUv2-style monocular depth: an RGB folder and a depth-PNG folder paired by file stem."""
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtvision.data.datasets.imagefolder import read_image
from mtvision.data.datasets.segmentation import pair_by_stem, read_dense_map
from mtvision.data.transforms import build_pipeline
from mtvision.registry import DATASETS

__all__ = ['DepthDataset']


@DATASETS.register_module()
class DepthDataset(Dataset):
    """Dense depth, returning ``(image, depth)`` with ``depth`` a ``Mask`` float32 [1, H, W] in metres.

    Depth maps are single-channel integer PNGs (uint16 for NYUv2) holding ``metres * depth_scale``; 0 marks
    pixels without a measurement and stays 0 (invalid) through the pipeline.

    Args:
        img_dir: folder of RGB images (searched recursively).
        depth_dir: folder of depth maps, mirroring ``img_dir``.
        pipeline: transform configs or a built transform.
        depth_scale: stored units per metre (1000 for millimetres; 256 for KITTI).
        img_suffix, depth_suffix: file name endings that pair ``<stem><img_suffix>`` with ``<stem><depth_suffix>``.
    """

    def __init__(self, img_dir: str | os.PathLike, depth_dir: str | os.PathLike,
                 pipeline: Sequence[dict] | Callable = (), depth_scale: float = 1000.0, img_suffix: str = '.jpg',
                 depth_suffix: str = '.png'):
        if depth_scale <= 0:
            raise ValueError(f'depth_scale must be positive, got {depth_scale}')
        self.depth_scale = depth_scale
        self.pipeline = build_pipeline(pipeline)
        self.samples = pair_by_stem(img_dir, depth_dir, img_suffix, depth_suffix)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image_path, depth_path = self.samples[index]
        image = read_image(image_path, index)
        stored = read_dense_map(depth_path, index, image.shape[-2:])
        depth = torch.from_numpy(stored.astype(np.float32) / self.depth_scale)[None]
        return self.pipeline(image, tv_tensors.Mask(depth))
