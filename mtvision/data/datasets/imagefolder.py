"""ImageNet-style classification: class folders, or an annotation list of ``relpath label`` lines.

Also holds the image reading shared by every loader (:func:`read_image`, :func:`list_images`).
"""
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtvision.data.collate import Sample
from mtvision.data.errors import DataError, DataProblems
from mtvision.data.transforms import build_pipeline
from mtvision.registry import DATASETS

__all__ = ['IMAGE_EXTENSIONS', 'ImageFolderDataset', 'list_images', 'read_image']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
_JPEG_START, _JPEG_SCAN, _JPEG_END = b'\xff\xd8', b'\xff\xda', b'\xff\xd9'


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
    if _jpeg_truncated(data):
        raise DataError('truncated JPEG file: no end-of-image marker after its scan data', path, index)
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))))


def _jpeg_truncated(data: np.ndarray) -> bool:
    # Some OpenCV builds decode a truncated JPEG into a partly grey image with only a console warning. Byte
    # stuffing keeps 0xFFD9 out of entropy-coded data, so a complete file has one after its first scan (an EXIF
    # thumbnail's own marker comes before it; bytes appended after the end marker do not matter).
    if data[:2].tobytes() != _JPEG_START:
        return False
    raw = data.tobytes()
    scan = raw.find(_JPEG_SCAN)
    return scan >= 0 and raw.find(_JPEG_END, scan) < 0


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
        errors: ``'raise'``: the first bad class folder or annotation line raises DataError; ``'collect'``: every
            problem is kept in :attr:`problems` and the bad entries are left out (used by the data audit).

    Attributes:
        problems: the problems found while indexing (warnings, and with ``errors='collect'`` errors too).

    DataError indices count samples: class-folder problems give the class index, annotation lines the index of
    the entry among the file's non-empty lines, and a sample read later the same entry index even when
    ``errors='collect'`` left earlier entries out.
    """

    def __init__(self, data_root: str | os.PathLike, pipeline: Sequence[dict] | Callable = (),
                 ann_file: str | os.PathLike | None = None, classes: Sequence[str] | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, errors: str = 'raise'):
        self.data_root = Path(data_root)
        self.pipeline = build_pipeline(pipeline)
        problems = DataProblems(errors)
        self.problems = problems.found
        # entry index of each sample when entries were left out (None: the sample index itself)
        self._entry_indices: list[int] | None = None
        if not self.data_root.is_dir():
            raise DataError('data_root is not a folder', self.data_root)
        if ann_file is None:
            self.classes, self.samples = self._scan_folders(classes, extensions, problems)
        else:
            self.classes, self.samples = self._read_ann_file(Path(ann_file), classes, problems)
        self.num_classes = len(self.classes)

    def _scan_folders(self, classes: Sequence[str] | None, extensions: Sequence[str],
                      problems: DataProblems) -> tuple[list[str], list[tuple[Path, int]]]:
        if classes is None:
            classes = sorted(entry.name for entry in os.scandir(self.data_root) if entry.is_dir())
            if not classes:
                raise DataError('no class folders found', self.data_root)
        samples = []
        for label, name in enumerate(classes):
            folder = self.data_root / name
            if not folder.is_dir():
                problems.report(DataError(f'class folder of class {label} ({name!r}) is missing', folder, label))
                continue
            images = list_images(folder, extensions)
            if not images:
                problems.report(DataError(f'class folder of class {label} holds no image with extension in '
                                          f'{tuple(extensions)}', folder, label))
            samples.extend((path, label) for path in images)
        return list(classes), samples

    def _line_problems(self, ann_file: Path, line_number: int, line: str, index: int,
                       classes: Sequence[str] | None) -> Iterator[DataError]:
        """The checks of one annotation line, in the order raise mode reports them."""
        parts = line.rsplit(maxsplit=1)
        label = _parse_label(parts)
        if label is None:
            yield DataError(f'line {line_number} is not "<relpath> <non-negative class index>": {line!r}',
                            ann_file, index)
            return
        if classes is not None and label >= len(classes):
            yield DataError(f'line {line_number}: class index {label} >= num_classes ({len(classes)})',
                            ann_file, index)
        path = self.data_root / parts[0].strip()
        if not path.is_file():
            yield DataError(f'line {line_number} names a missing image file {str(path)!r}', ann_file, index)

    def _read_ann_file(self, ann_file: Path, classes: Sequence[str] | None,
                       problems: DataProblems) -> tuple[list[str], list[tuple[Path, int]]]:
        try:
            lines = ann_file.read_text().splitlines()
        except OSError as error:
            raise DataError(f'cannot read annotation file ({error.strerror or error})', ann_file) from error
        samples, entry_indices = [], []
        entries = [(line_number, line) for line_number, line in enumerate(lines, start=1) if line.strip()]
        for index, (line_number, line) in enumerate(entries):
            if not problems.report(self._line_problems(ann_file, line_number, line, index, classes)):
                parts = line.rsplit(maxsplit=1)
                samples.append((self.data_root / parts[0].strip(), _parse_label(parts)))
                entry_indices.append(index)
        if not entries:
            problems.report(DataError('annotation file lists no images', ann_file))
        if len(samples) < len(entries):
            self._entry_indices = entry_indices
        if classes is None:
            classes = [str(label) for label in range(max((label for _, label in samples), default=-1) + 1)]
        return list(classes), samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        entry = index if self._entry_indices is None else self._entry_indices[index]
        return Sample(self.pipeline(read_image(path, entry)), label, path)


def _parse_label(parts: list[str]) -> int | None:
    """The class index of a split annotation line; None unless it is a non-negative integer."""
    try:
        label = int(parts[1]) if len(parts) == 2 else None
    except ValueError:
        return None
    return label if label is not None and label >= 0 else None
