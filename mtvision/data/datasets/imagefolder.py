"""ImageNet-style classification: class folders, or an annotation list of ``relpath label`` lines.

Also holds the image reading shared by every loader (:func:`read_image`, :func:`list_images`).
"""
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtvision.data.errors import DataError
from mtvision.data.transforms import build_pipeline
from mtvision.registry import DATASETS

__all__ = ['IMAGE_EXTENSIONS', 'ImageFolderDataset', 'list_images', 'read_image']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


def read_image(path: str | os.PathLike, index: int | None = None) -> tv_tensors.Image:
    """Read an image file as an RGB uint8 ``tv_tensors.Image`` [3, H, W]; DataError when missing or corrupt."""
    # imdecode(fromfile) rather than imread: imread gives None without saying whether the file is missing
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise DataError(f'cannot read image file ({error.strerror or error})', path, index) from error
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise DataError('corrupt or unsupported image file', path, index)
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))))


def list_images(folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``folder`` (recursively, symlinks followed), sorted; extensions match case-insensitively."""
    suffixes = tuple(extension.lower() for extension in extensions)
    found = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories.sort()
        found.extend(Path(directory, name) for name in files if name.lower().endswith(suffixes))
    return sorted(found)


@DATASETS.register_module()
class ImageFolderDataset(Dataset):
    """Single-label classification, returning ``(image, class_index)``.

    Without ``ann_file``, every sub-folder of ``data_root`` is a class (sorted names, or the order of ``classes``)
    and every image below it a sample. With ``ann_file``, each non-empty line is ``<relpath> <label>``, the path
    relative to ``data_root`` (it may contain spaces) and the label a class index.

    Args:
        data_root: folder of class folders, or the folder the annotation paths are relative to.
        pipeline: transform configs (see :func:`~mtvision.data.transforms.build_pipeline`) or a built transform.
        ann_file: optional annotation list.
        classes: class names; required order for class folders, and with ``ann_file`` it bounds the labels
            (without it there are ``max(label) + 1`` classes named by their index).
        extensions: image file extensions, matched case-insensitively.
    """

    def __init__(self, data_root: str | os.PathLike, pipeline: Sequence[dict] | Callable = (),
                 ann_file: str | os.PathLike | None = None, classes: Sequence[str] | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.data_root = Path(data_root)
        self.pipeline = build_pipeline(pipeline)
        if not self.data_root.is_dir():
            raise DataError('data_root is not a folder', self.data_root)
        if ann_file is None:
            self.classes, self.samples = self._scan_folders(classes, extensions)
        else:
            self.classes, self.samples = self._read_ann_file(Path(ann_file), classes)
        self.num_classes = len(self.classes)

    def _scan_folders(self, classes: Sequence[str] | None,
                      extensions: Sequence[str]) -> tuple[list[str], list[tuple[Path, int]]]:
        if classes is None:
            classes = sorted(entry.name for entry in os.scandir(self.data_root) if entry.is_dir())
            if not classes:
                raise DataError('no class folders found', self.data_root)
        samples = []
        for label, name in enumerate(classes):
            folder = self.data_root / name
            if not folder.is_dir():
                raise DataError(f'class folder of class {label} ({name!r}) is missing', folder, label)
            images = list_images(folder, extensions)
            if not images:
                raise DataError(f'class folder of class {label} holds no image with extension in {tuple(extensions)}',
                                folder, label)
            samples.extend((path, label) for path in images)
        return list(classes), samples

    def _read_ann_file(self, ann_file: Path, classes: Sequence[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
        try:
            lines = ann_file.read_text().splitlines()
        except OSError as error:
            raise DataError(f'cannot read annotation file ({error.strerror or error})', ann_file) from error
        samples = []
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            index = len(samples)
            parts = line.rsplit(maxsplit=1)
            try:
                label = int(parts[1]) if len(parts) == 2 else None
            except ValueError:
                label = None
            if label is None or label < 0:
                raise DataError(f'line {line_number} is not "<relpath> <non-negative class index>": {line!r}',
                                ann_file, index)
            if classes is not None and label >= len(classes):
                raise DataError(f'line {line_number}: class index {label} >= num_classes ({len(classes)})',
                                ann_file, index)
            path = self.data_root / parts[0].strip()
            if not path.is_file():
                raise DataError(f'line {line_number} names a missing image file {str(path)!r}', ann_file, index)
            samples.append((path, label))
        if not samples:
            raise DataError('annotation file lists no images', ann_file)
        if classes is None:
            classes = [str(label) for label in range(max(label for _, label in samples) + 1)]
        return list(classes), samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.pipeline(read_image(path, index)), label
