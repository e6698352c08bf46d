"""Images labelled for several tasks at once: dense maps of the same stems (NYUv2-like), and multi-label lists."""
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtvision.data.collate import Sample
from mtvision.data.datasets.depth import DepthDataset
from mtvision.data.datasets.imagefolder import _parse_label, read_classes, read_image
from mtvision.data.datasets.segmentation import SegmentationDataset, pair_by_stem
from mtvision.data.errors import DataError, DataProblems
from mtvision.data.surface_normals import SurfaceNormals, decode_normals
from mtvision.data.transforms import build_pipeline
from mtvision.registry import DATASETS

__all__ = ['DenseMultiTaskDataset', 'MultiLabelImageList', 'read_normal_map']

DENSE_TASKS = ('segmentation', 'depth', 'normals')


def read_normal_map(path: str | os.PathLike, index: int, image_size: tuple[int, int] | None) -> Tensor:
    """A normal PNG (RGB uint8, ``(0, 0, 0)`` = invalid; see :mod:`mtvision.data.surface_normals`) as float32
    ``[3, H, W]`` unit vectors. DataError when missing, unreadable, not 3-channel uint8, or not ``image_size``."""
    data = np.fromfile(path, dtype=np.uint8) if Path(path).is_file() else np.empty(0, dtype=np.uint8)
    stored = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if stored is None:
        raise DataError('missing or corrupt normal map file', path, index)
    if stored.ndim != 3 or stored.shape[2] != 3 or stored.dtype != np.uint8:
        raise DataError(f'normal map must be 3-channel uint8 RGB, got shape {stored.shape} {stored.dtype}', path,
                        index)
    _check_size(stored.shape[:2], path, index, image_size)
    return torch.from_numpy(decode_normals(cv2.cvtColor(stored, cv2.COLOR_BGR2RGB)))


def _check_size(size: Sequence[int], path, index: int, image_size: tuple[int, int] | None) -> None:
    if image_size is not None and tuple(size) != tuple(image_size):
        raise DataError(f'map is {size[0]}x{size[1]} but its image is {image_size[0]}x{image_size[1]}', path, index)


@DATASETS.register_module()
class DenseMultiTaskDataset(Dataset):
    """One image folder with several dense targets of the same stems (NYUv2's segmentation, depth and normals).

    Returns ``(image, targets)`` with ``targets`` holding, for each folder given: ``'segmentation'``, a ``Mask``
    int64 [H, W] (:class:`SegmentationDataset`'s format and checks); ``'depth'``, a ``Mask`` float32 [1, H, W] in
    metres, 0 = invalid (:class:`DepthDataset`'s); ``'normals'``, :class:`SurfaceNormals` float32 [3, H, W], zero =
    invalid. One joint pipeline moves the image and every target together, so they stay aligned; flips negate the
    normals' x (y) component and resizes sample them pixel-centred (see :mod:`mtvision.data.surface_normals`).
    Label and depth maps are both ``Mask``, so a padding transform fills them with the same value: keep the default
    0 (background, invalid depth) or do not pad; ``fill=dict(Mask=255)`` would read as 255 m of depth. With one
    folder the target is that map itself, as the single-task datasets return theirs, so the dataset also serves one
    task of its type (a normals task).

    Args:
        img_dir: folder of images (searched recursively).
        seg_dir, depth_dir, normal_dir: folders of label maps, depth maps and normal maps mirroring ``img_dir``;
            at least one.
        num_classes, classes, reduce_zero_label, ignore_index: as :class:`SegmentationDataset`'s (``num_classes``
            is needed with ``seg_dir``).
        depth_scale, depth_dtype: as :class:`DepthDataset`'s.
        img_suffix, seg_suffix, depth_suffix, normal_suffix: file name endings pairing the files by stem.
        errors: ``'raise'``: an image lacking one of its maps raises DataError; ``'collect'``: it is kept in
            :attr:`problems` and left out (errors keep naming its index among all images).
    """

    def __init__(self, img_dir: str | os.PathLike, pipeline: Sequence[dict] | Callable = (),
                 seg_dir: str | os.PathLike | None = None, depth_dir: str | os.PathLike | None = None,
                 normal_dir: str | os.PathLike | None = None, num_classes: int | None = None,
                 classes: Sequence[str] | None = None, reduce_zero_label: bool = False, ignore_index: int = 255,
                 depth_scale: float = 1000.0, depth_dtype: str | None = 'uint16', img_suffix: str = '.jpg',
                 seg_suffix: str = '.png', depth_suffix: str = '.png', normal_suffix: str = '.png',
                 errors: str = 'raise'):
        if seg_dir is None and depth_dir is None and normal_dir is None:
            raise ValueError('DenseMultiTaskDataset needs at least one of seg_dir, depth_dir and normal_dir')
        if seg_dir is not None and num_classes is None:
            raise ValueError('DenseMultiTaskDataset needs num_classes with seg_dir')
        self.pipeline = build_pipeline(pipeline)
        problems = DataProblems(errors)
        self.problems = problems.found
        # the single-task loaders read and check their maps: one reader per format
        self._loaders: dict[str, Dataset] = {}
        pairs: dict[str, tuple] = {}
        if seg_dir is not None:
            self._loaders['segmentation'] = SegmentationDataset(
                img_dir, seg_dir, num_classes, classes=classes, img_suffix=img_suffix, seg_suffix=seg_suffix,
                reduce_zero_label=reduce_zero_label, ignore_index=ignore_index, errors=errors)
            self.num_classes, self.classes = num_classes, self._loaders['segmentation'].classes
            self.ignore_index = ignore_index
        if depth_dir is not None:
            self._loaders['depth'] = DepthDataset(img_dir, depth_dir, depth_scale=depth_scale, img_suffix=img_suffix,
                                                  depth_suffix=depth_suffix, depth_dtype=depth_dtype, errors=errors)
        for task, loader in self._loaders.items():
            pairs[task] = (loader.samples, loader._entry_indices)
            self.problems.extend(loader.problems)
        if normal_dir is not None:
            pairs['normals'] = pair_by_stem(img_dir, normal_dir, img_suffix, normal_suffix, problems,
                                            kind='normal map')
        self.tasks = tuple(task for task in DENSE_TASKS if task in pairs)
        self._join(pairs)

    def _join(self, pairs: dict[str, tuple]) -> None:
        """Keep the images that every target pairs, with their row in each target's table and their index among
        all images found (which errors name)."""
        rows: dict[str, dict[str, tuple[int, int]]] = {}
        for task, (table, entry_indices) in pairs.items():
            rows[task] = {str(table[row][0]): (row, row if entry_indices is None else int(entry_indices[row]))
                          for row in range(len(table))}
        first = rows[self.tasks[0]]
        self.images = [image for image in first if all(image in rows[task] for task in self.tasks)]
        self._rows = {task: [rows[task][image][0] for image in self.images] for task in self.tasks}
        self._entry_indices = [first[image][1] for image in self.images]
        self._map_paths = {task: pairs[task][0] for task in self.tasks}

    def __len__(self) -> int:
        return len(self.images)

    def map_path(self, index: int, task: str) -> str:
        """The file holding sample ``index``'s ``task`` target."""
        return str(self._map_paths[task][self._rows[task][index]][1])

    def _read_target(self, index: int, task: str, image_size: tuple[int, int] | None) -> Tensor:
        if task not in self.tasks:
            raise KeyError(f'no {task!r} target; this dataset has {self.tasks}')
        entry = self._entry_indices[index]
        if task == 'normals':
            return read_normal_map(self.map_path(index, task), entry, image_size)
        target = self._loaders[task].original_target(self._rows[task][index])
        _check_size(target.shape[-2:], self.map_path(index, task), entry, image_size)
        return target

    def __getitem__(self, index: int):
        image = read_image(self.images[index], self._entry_indices[index])
        size = tuple(image.shape[-2:])
        wrappers = dict(segmentation=tv_tensors.Mask, depth=tv_tensors.Mask, normals=SurfaceNormals)
        targets = {task: wrappers[task](self._read_target(index, task, size)) for task in self.tasks}
        image, targets = self.pipeline(image, targets)
        return Sample(image, self._single(targets), self.images[index])

    def _single(self, targets: dict):
        """With one target folder the target itself, as the single-task datasets return theirs, so that the
        dataset serves one task of its type as well as a group."""
        return targets[self.tasks[0]] if len(self.tasks) == 1 else targets

    def original_target(self, index: int, task: str | None = None) -> Tensor | dict[str, Tensor]:
        """Sample ``index``'s ``task`` target as stored, untouched by the pipeline (the single-task loaders'
        formats; normals float32 [3, H, W]), or with ``task=None`` every target in a dict keyed like
        ``__getitem__``'s. The evaluator compares predictions resized to it."""
        if task is None:
            return self._single({name: self._read_target(index, name, None) for name in self.tasks})
        return self._read_target(index, task, None)


@DATASETS.register_module()
class MultiLabelImageList(Dataset):
    """Multi-label classification from a list file, returning ``(image, FloatTensor[K])`` multi-hot targets.

    Each non-empty line is ``<relpath> [<label> ...]``: an image path relative to ``data_root`` (no spaces), then
    the classes present, as class indices or names of ``classes``, separated by spaces; a line with no label is an
    image showing none of the classes. The synthetic shared-images layout writes ``multilabel/<split>.txt`` so.

    Args:
        data_root: the folder the image paths are relative to.
        ann_file: the list file.
        num_classes: K; taken from ``classes`` when omitted.
        classes: class names (a list or a text file of one name per line, as :class:`ImageFolderDataset`).
        pipeline: transform configs or a built transform (the image only).
        errors: ``'raise'``: the first bad line raises DataError; ``'collect'``: bad lines go to :attr:`problems`
            and are left out. DataError indices count the list's non-empty lines.
    """

    def __init__(self, data_root: str | os.PathLike, ann_file: str | os.PathLike, num_classes: int | None = None,
                 classes: Sequence[str] | str | os.PathLike | None = None, pipeline: Sequence[dict] | Callable = (),
                 errors: str = 'raise'):
        names = read_classes(classes)
        if num_classes is None and names is None:
            raise ValueError('MultiLabelImageList needs num_classes or classes')
        if names is not None and num_classes is not None and len(names) != num_classes:
            raise ValueError(f'{len(names)} class names given for num_classes={num_classes}')
        self.num_classes = num_classes if num_classes is not None else len(names)
        self.classes = names if names is not None else [str(label) for label in range(self.num_classes)]
        self.data_root, ann_file = Path(data_root), Path(ann_file)
        self.pipeline = build_pipeline(pipeline)
        problems = DataProblems(errors)
        self.problems = problems.found
        try:
            lines = ann_file.read_text().splitlines()
        except OSError as error:
            raise DataError(f'cannot read annotation file ({error.strerror or error})', ann_file) from error
        entries = [(line_number, line) for line_number, line in enumerate(lines, start=1) if line.strip()]
        class_indices = {name: label for label, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, list[int]]] = []
        self._entry_indices: list[int] = []
        for index, (line_number, line) in enumerate(entries):
            sample, found = self._entry(ann_file, line_number, line, index, class_indices)
            if not problems.report(found):
                self.samples.append(sample)
                self._entry_indices.append(index)
        if not entries:
            problems.report(DataError('annotation file lists no images', ann_file))

    def _entry(self, ann_file: Path, line_number: int, line: str, index: int,
               class_indices: dict[str, int]) -> tuple[tuple[Path, list[int]] | None, list[DataError]]:
        relpath, *tokens = line.split()
        problems, labels = [], []
        for token in tokens:
            label = _parse_label(token, class_indices)
            if label is None or label >= self.num_classes:
                problems.append(DataError(f'line {line_number}: label {token!r} is not a class index below '
                                          f'num_classes ({self.num_classes}) nor a class name', ann_file, index))
            elif label in labels:
                problems.append(DataError(f'line {line_number}: class {label} is listed twice', ann_file, index))
            else:
                labels.append(label)
        path = self.data_root / relpath
        if not path.is_file():
            problems.append(DataError(f'line {line_number} names a missing image file {str(path)!r}', ann_file,
                                      index))
        return (None if problems else (path, sorted(labels))), problems

    def __len__(self) -> int:
        return len(self.samples)

    def target(self, index: int) -> Tensor:
        """Sample ``index``'s multi-hot float32 [K] target."""
        multi_hot = torch.zeros(self.num_classes, dtype=torch.float32)
        multi_hot[self.samples[index][1]] = 1
        return multi_hot

    def __getitem__(self, index: int):
        path = self.samples[index][0]
        return Sample(self.pipeline(read_image(path, self._entry_indices[index])), self.target(index), path)
