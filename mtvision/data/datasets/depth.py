"""NYUv2-style monocular depth: RGB images and depth PNGs paired by file name."""
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtvision.data.collate import Sample
from mtvision.data.datasets.imagefolder import read_image
from mtvision.data.datasets.segmentation import pair_by_stem, read_dense_map
from mtvision.data.errors import DataError, DataProblems
from mtvision.data.transforms import build_pipeline
from mtvision.registry import DATASETS

__all__ = ['DepthDataset']


@DATASETS.register_module()
class DepthDataset(Dataset):
    """Dense depth, returning ``(image, depth)`` with ``depth`` a ``Mask`` float32 [1, H, W] in metres.

    Depth maps are single-channel integer PNGs (uint16 for NYUv2 and KITTI) holding ``metres * depth_scale``; 0
    marks pixels without a measurement and stays 0 (invalid) through the pipeline. A map of another dtype raises
    DataError when read: an 8-bit map (a depth picture saved for viewing) cannot hold millimetres.

    Images pair with depth maps by relative path and name: ``<img_prefix><stem><img_suffix>`` under ``img_dir``
    with ``<depth_prefix><stem><depth_suffix>`` at the same relative place under ``depth_dir``. NYUv2 as
    ``tools/prepare_nyuv2.py`` writes it (``<split>/rgb/<stem>.png``, ``<split>/depth/<stem>.png``) reads with
    ``img_suffix='.png'``; BTS's "sync" download (``<scene>/rgb_00000.jpg`` beside ``<scene>/sync_depth_00000.png``,
    millimetres) with ``img_dir == depth_dir``, ``img_prefix='rgb_'`` and ``depth_prefix='sync_depth_'``.

    Args:
        img_dir: folder of RGB images (searched recursively).
        depth_dir: folder of depth maps, mirroring ``img_dir`` (may be ``img_dir`` itself, see the prefixes).
        pipeline: transform configs or a built transform.
        depth_scale: stored units per metre (1000 for millimetres; 256 for KITTI).
        img_suffix, depth_suffix: file name endings of images and depth maps.
        img_prefix, depth_prefix: file name beginnings of images and depth maps; only files starting with
            ``img_prefix`` are taken as images.
        depth_dtype: the dtype the maps are stored in; None accepts any single-channel map.
        errors: ``'raise'``: an image without a depth map raises DataError; ``'collect'``: it is kept in
            :attr:`problems` and left out, and later errors still name its index among all images (data audit).
    """

    def __init__(self, img_dir: str | os.PathLike, depth_dir: str | os.PathLike,
                 pipeline: Sequence[dict] | Callable = (), depth_scale: float = 1000.0, img_suffix: str = '.jpg',
                 depth_suffix: str = '.png', depth_dtype: str | None = 'uint16', errors: str = 'raise',
                 img_prefix: str = '', depth_prefix: str = ''):
        if depth_scale <= 0:
            raise ValueError(f'depth_scale must be positive, got {depth_scale}')
        try:
            self.depth_dtype = None if depth_dtype is None else np.dtype(depth_dtype)
        except TypeError as error:
            raise ValueError(f'depth_dtype={depth_dtype!r} is not a numpy dtype') from error
        self.depth_scale = depth_scale
        self.pipeline = build_pipeline(pipeline)
        problems = DataProblems(errors)
        self.problems = problems.found
        self.samples, self._entry_indices = pair_by_stem(img_dir, depth_dir, img_suffix, depth_suffix, problems,
                                                         img_prefix, depth_prefix, kind='depth map')

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> tuple[Tensor, Tensor]:
        """The image and the depth in metres [1, H, W] as stored, checked, before the pipeline."""
        image = read_image(self.samples[index][0], self._entry_index(index))
        return image, self._read_depth(index, image.shape[-2:])

    def _entry_index(self, index: int) -> int:
        """``index`` among all images found, which errors name (images without a map may have been left out)."""
        return index if self._entry_indices is None else int(self._entry_indices[index])

    def _read_depth(self, index: int, image_size: tuple[int, int] | None) -> Tensor:
        depth_path, index = self.samples[index][1], self._entry_index(index)
        stored = read_dense_map(depth_path, index, image_size)
        if self.depth_dtype is not None and stored.dtype != self.depth_dtype:
            raise DataError(f'depth map is stored as {stored.dtype}, expected {self.depth_dtype} '
                            f'(metres * depth_scale={self.depth_scale:g})', depth_path, index)
        return torch.from_numpy(stored.astype(np.float32) / self.depth_scale)[None]

    def __getitem__(self, index: int):
        image, depth = self._read(index)
        return Sample(*self.pipeline(image, tv_tensors.Mask(depth)), self.samples[index][0])

    def original_target(self, index: int) -> Tensor:
        """Sample ``index``'s ground truth as stored on disk, untouched by the pipeline: float32 [1, H, W] in
        metres, 0 = invalid. Evaluation at the original resolution compares predictions resized to it. The image is
        not decoded again: the map's size against it is checked when the sample itself is read."""
        return self._read_depth(index, None)
