"""ADE20K-style semantic segmentation: an image folder and a label-map folder paired by file stem.

Also holds what the dense-map loaders (segmentation, depth) share: :func:`pair_by_stem`, :func:`read_dense_map`.
"""
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtvision.data.collate import Sample
from mtvision.data.datasets.imagefolder import list_images, read_image
from mtvision.data.datasets.index import SampleTable
from mtvision.data.errors import DataError, DataProblems
from mtvision.data.transforms import build_pipeline
from mtvision.registry import DATASETS

__all__ = ['SegmentationDataset', 'pair_by_stem', 'read_dense_map']


def pair_by_stem(img_dir: str | os.PathLike, label_dir: str | os.PathLike, img_suffix: str, label_suffix: str,
                 problems: DataProblems | None = None, img_prefix: str = '', label_prefix: str = '',
                 kind: str = 'label map') -> tuple[SampleTable, np.ndarray | None]:
    """``(image, label map)`` paths for every image under ``img_dir``, matched by relative path minus suffix: an
    image ``<img_prefix><stem><img_suffix>`` pairs with ``<label_prefix><stem><label_suffix>`` in the mirrored
    folder. Prefixes serve layouts such as BTS's NYUv2 "sync" download, ``<scene>/rgb_00000.jpg`` beside
    ``<scene>/sync_depth_00000.png`` (``img_dir == label_dir`` is allowed then); only files starting with
    ``img_prefix`` are images.

    DataError when a folder is missing or holds no image. An image without its map (``kind`` names it in messages)
    goes to ``problems`` (raised by default); when ``problems`` collects, the image is left out, and the second
    value gives each kept pair's index among all images (None when none was left out), so that later errors name
    the same index. The pairs are a :class:`~mtvision.data.datasets.index.SampleTable`, which DataLoader workers
    share rather than copy.
    """
    problems = problems if problems is not None else DataProblems()
    img_dir, label_dir = Path(img_dir), Path(label_dir)
    if (img_dir.resolve() == label_dir.resolve() and img_suffix.lower() == label_suffix.lower()
            and label_prefix.startswith(img_prefix)):
        raise ValueError(f'images and {kind}s share the folder {str(img_dir)!r} and the suffix {img_suffix!r}: '
                         f'img_prefix={img_prefix!r} must tell them apart from the {kind} prefix {label_prefix!r}')
    for folder in (img_dir, label_dir):
        if not folder.is_dir():
            raise DataError('folder is missing', folder)
    images = [path for path in list_images(img_dir, (img_suffix,)) if path.name.startswith(img_prefix)]
    if not images:
        raise DataError(f'no images named {img_prefix}*{img_suffix}', img_dir)
    pairs, indices = [], []
    for index, image in enumerate(images):
        relative = image.relative_to(img_dir)
        stem = relative.name[len(img_prefix):len(relative.name) - len(img_suffix)]
        label = label_dir / relative.parent / f'{label_prefix}{stem}{label_suffix}'
        if label.is_file():
            pairs.append((image, label))
            indices.append(index)
        else:
            problems.report(DataError(f'image {str(image)!r} has no {kind} {str(label)!r}', label_dir, index))
    left_out = len(pairs) < len(images)
    return SampleTable.from_rows(pairs, width=2), (np.asarray(indices, dtype=np.int64) if left_out else None)


def read_dense_map(path: str | os.PathLike, index: int, image_size: tuple[int, int] | None) -> np.ndarray:
    """A single-channel map (label ids, depth) read as stored, e.g. uint8 or uint16.

    DataError when it is missing, unreadable, has several channels, or its size is not ``image_size`` (None: not
    checked, for a caller that checks it with the image elsewhere).
    """
    data = np.fromfile(path, dtype=np.uint8) if Path(path).is_file() else np.empty(0, dtype=np.uint8)
    dense_map = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if dense_map is None:
        raise DataError('missing or corrupt map file', path, index)
    if dense_map.ndim != 2:
        raise DataError(f'map must have one channel, got shape {dense_map.shape} (a palette or colour PNG?)',
                        path, index)
    if image_size is not None and dense_map.shape != tuple(image_size):
        raise DataError(f'map is {dense_map.shape[0]}x{dense_map.shape[1]} but its image is '
                        f'{image_size[0]}x{image_size[1]}', path, index)
    return dense_map


@DATASETS.register_module()
class SegmentationDataset(Dataset):
    """Semantic segmentation, returning ``(image, label_map)`` with ``label_map`` a ``Mask`` int64 [H, W].

    Label maps are single-channel PNGs of class ids; ``ignore_index`` marks pixels without a label. Values
    ``>= num_classes`` other than ``ignore_index`` raise DataError when the sample is read.

    Args:
        img_dir: folder of images (searched recursively).
        ann_dir: folder of label maps, mirroring ``img_dir``.
        num_classes: number of classes (after ``reduce_zero_label``).
        pipeline: transform configs or a built transform.
        classes: class names; default ``'0'``, ``'1'``, ...
        img_suffix, seg_suffix: file name endings that pair ``<stem><img_suffix>`` with ``<stem><seg_suffix>``.
        reduce_zero_label: real ADE20K's convention: stored 0 ("other") becomes ignore and class ``c`` becomes
            ``c - 1``.
        ignore_index: label of unlabelled pixels.
        errors: ``'raise'``: an image without a label map raises DataError; ``'collect'``: it is kept in
            :attr:`problems` and left out, and later errors still name its index among all images (data audit).
    """

    def __init__(self, img_dir: str | os.PathLike, ann_dir: str | os.PathLike, num_classes: int,
                 pipeline: Sequence[dict] | Callable = (), classes: Sequence[str] | None = None,
                 img_suffix: str = '.jpg', seg_suffix: str = '.png', reduce_zero_label: bool = False,
                 ignore_index: int = 255, errors: str = 'raise'):
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f'{len(classes)} class names given for num_classes={num_classes}')
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else [str(label) for label in range(num_classes)]
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.pipeline = build_pipeline(pipeline)
        problems = DataProblems(errors)
        self.problems = problems.found
        self.samples, self._entry_indices = pair_by_stem(img_dir, ann_dir, img_suffix, seg_suffix, problems)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image, labels = self._read(index)
        return Sample(*self.pipeline(image, tv_tensors.Mask(torch.from_numpy(labels))), self.samples[index][0])

    def original_target(self, index: int) -> torch.Tensor:
        """The label map of sample ``index`` as stored, untouched by the pipeline: ``LongTensor[H, W]`` at the
        image's original size, in the training target's ids (after ``reduce_zero_label``; ``ignore_index`` kept).
        The evaluator scores predictions resized to this size (mmseg's protocol). The image is not decoded again:
        the map's size against it is checked when the sample itself is read."""
        return torch.from_numpy(self._read_labels(index, None))

    def _read(self, index: int) -> tuple[tv_tensors.Image, np.ndarray]:
        """The image and its checked label ids (int64 [H, W]) of sample ``index``, before the pipeline."""
        image = read_image(self.samples[index][0], self._entry_index(index))
        return image, self._read_labels(index, image.shape[-2:])

    def _entry_index(self, index: int) -> int:
        """``index`` among all images found, which errors name (entries without a map may have been left out)."""
        return index if self._entry_indices is None else int(self._entry_indices[index])

    def _read_labels(self, index: int, image_size: tuple[int, int] | None) -> np.ndarray:
        label_path, index = self.samples[index][1], self._entry_index(index)
        labels = read_dense_map(label_path, index, image_size).astype(np.int64)
        if self.reduce_zero_label:
            # mmseg's LoadAnnotations(reduce_zero_label=True): 0 -> 255, c -> c - 1, 255 stays 255
            ignored = (labels == 0) | (labels == self.ignore_index)
            labels = np.where(ignored, self.ignore_index, labels - 1)
        invalid = (labels >= self.num_classes) & (labels != self.ignore_index) | (labels < 0)
        if invalid.any():
            raise DataError(f'label ids {np.unique(labels[invalid]).tolist()[:10]} are out of range for '
                            f'num_classes={self.num_classes} (ignore_index={self.ignore_index})', label_path, index)
        return labels
