"""ImageNet-style classification: class folders, or a label list (mmpretrain's ``val.txt``, Kaggle's CSV).

Also holds the image reading shared by every loader (:func:`read_image`, :func:`list_images`).
"""
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtvision.data.collate import Sample
from mtvision.data.datasets.index import SampleTable
from mtvision.data.errors import DataError, DataProblems
from mtvision.data.transforms import build_pipeline
from mtvision.registry import DATASETS

__all__ = ['IMAGE_EXTENSIONS', 'ImageFolderDataset', 'check_class_order', 'class_folder_names', 'list_images',
           'read_classes', 'read_image']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
_JPEG_START, _JPEG_SCAN, _JPEG_END = b'\xff\xd8', b'\xff\xda', b'\xff\xd9'


def read_image(path: str | os.PathLike, index: int | None = None,
               apply_exif_orientation: bool = False) -> tv_tensors.Image:
    """Read an image file as an RGB uint8 ``tv_tensors.Image`` [3, H, W]; DataError when missing or corrupt.

    Every kind of file real datasets hold comes out the same way: grayscale is repeated over the three channels;
    alpha (RGBA, LA, a palette's transparency) is dropped and the colour stored under it kept, as PIL's
    ``convert('RGB')`` (torchvision's and timm's folder loaders) and OpenCV's ``IMREAD_COLOR`` (mmcv) do; CMYK and
    YCCK JPEGs are converted by libjpeg; 16-bit samples keep their high byte (``>> 8``, 65535 -> 255): one fixed
    mapping for every image of a dataset, where scaling by each image's maximum would stretch each one's contrast
    differently (OpenCV's 8-bit decode rounds TIFFs but truncates PNGs; this is the same for both).

    Args:
        path: the image file.
        index: the sample index, named in errors.
        apply_exif_orientation: turn the pixels as the EXIF orientation tag says, as a photo viewer shows them.
            Off by default, as in torchvision's and timm's PIL loaders: annotations in pixel coordinates (COCO
            boxes and polygons, label maps, depth maps) refer to the image as stored, which the tag would rotate
            away from them, and an image shared by several tasks then reads the same in each. Only datasets whose
            labels do not depend on position (classification folders, unlabeled images) may turn it on.
    """
    # imdecode(fromfile) rather than imread: imread gives None without saying whether the file is missing
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise DataError(f'cannot read image file ({error.strerror or error})', path, index) from error
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH  # ANYDEPTH: 16-bit samples arrive whole, reduced below
    if not apply_exif_orientation:
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise DataError('corrupt or unsupported image file', path, index)
    if _jpeg_truncated(data):
        raise DataError('truncated JPEG file: no end-of-image marker after its scan data', path, index)
    image = _to_uint8(image, path, index)
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))))


def _to_uint8(image: np.ndarray, path: str | os.PathLike, index: int | None) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    # e.g. float TIFFs, whose range (0..1, 0..255 or physical units) the file does not state
    raise DataError(f'{image.dtype} samples are not an 8- or 16-bit image', path, index)


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


# Kaggle's ImageNet download (ILSVRC/Data/CLS-LOC/val/<ImageId>.JPEG, LOC_val_solution.csv, LOC_synset_mapping.txt)
_SOLUTION_HEADER = 'ImageId,PredictionString'
_SOLUTION_IMAGE_SUFFIX = '.JPEG'
_SYNSET_MAPPING = 'LOC_synset_mapping.txt'
_WNID_LINE = re.compile(r'n\d{8}\s')


@DATASETS.register_module()
class ImageFolderDataset(Dataset):
    """Single-label classification, returning ``(image, class_index)``.

    Without ``ann_file``, every sub-folder of ``data_root`` is a class (sorted names, or the order of ``classes``)
    and every image below it a sample: ImageNet's ``train/<wnid>/*.JPEG``. With ``ann_file``, a label list names
    the images under ``data_root``; its format is told by its first line:

    - ``<relpath> <label>`` per line (mmpretrain's ``meta/val.txt``, e.g. ``ILSVRC2012_val_00000001.JPEG 65``): the
      path may contain spaces; the label is a class index, or a class name of ``classes``.
    - Kaggle's ``LOC_val_solution.csv``: the header ``ImageId,PredictionString``, then lines such as
      ``ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...``; the image is ``<ImageId>.JPEG`` and the label the
      first wnid of the prediction string (the boxes are ignored). Its classes default to ``LOC_synset_mapping.txt``
      beside the file.

    Args:
        data_root: folder of class folders, or the folder the annotation paths are relative to.
        pipeline: transform configs (see :func:`~mtvision.data.transforms.build_pipeline`) or a built transform.
        ann_file: optional label list, in one of the formats above.
        classes: the class names, in label order: a list; a folder, whose sub-folder names (sorted) are the classes
            (the training set's ``train/``, so that val labels index its classes); or a text file of one class per
            line, where a ``<wnid> <description>`` line (``LOC_synset_mapping.txt``) gives the wnid. Required
            order for class folders; with ``ann_file`` it maps names to indices and bounds the labels (without it
            there are ``max(label) + 1`` classes named by their index, and :attr:`anonymous_classes` is true).
        extensions: image file extensions, matched case-insensitively.
        errors: ``'raise'``: the first bad class folder or annotation line raises DataError; ``'collect'``: every
            problem is kept in :attr:`problems` and the bad entries are left out (used by the data audit).

    Attributes:
        problems: the problems found while indexing (warnings, and with ``errors='collect'`` errors too).
        anonymous_classes: whether the class names are made up from the label indices (no names to check).

    DataError indices count samples: class-folder problems give the class index, annotation lines the index of
    the entry among the file's non-empty lines (a CSV header is not an entry), and a sample read later the same
    entry index even when ``errors='collect'`` left earlier entries out. Messages give the line number.
    """

    def __init__(self, data_root: str | os.PathLike, pipeline: Sequence[dict] | Callable = (),
                 ann_file: str | os.PathLike | None = None,
                 classes: Sequence[str] | str | os.PathLike | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, errors: str = 'raise'):
        self.data_root = Path(data_root)
        self.pipeline = build_pipeline(pipeline)
        problems = DataProblems(errors)
        self.problems = problems.found
        # entry index of each sample when entries were left out (None: the sample index itself)
        self._entry_indices: np.ndarray | None = None
        if not self.data_root.is_dir():
            raise DataError('data_root is not a folder', self.data_root)
        classes = read_classes(classes)
        self.anonymous_classes = False
        if ann_file is None:
            self.classes, samples = self._scan_folders(classes, extensions, problems)
        else:
            self.classes, samples = self._read_ann_file(Path(ann_file), classes, problems)
        # (path, label) rows in two arrays, which DataLoader workers share instead of copying (datasets/index.py)
        self.samples = SampleTable.from_rows(samples, width=2)
        self.num_classes = len(self.classes)

    def _scan_folders(self, classes: list[str] | None, extensions: Sequence[str],
                      problems: DataProblems) -> tuple[list[str], list[tuple[Path, int]]]:
        if classes is None:
            classes = class_folder_names(self.data_root)
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
        return classes, samples

    def _parse_entry(self, line: str, solution: bool) -> tuple[str, str] | None:
        """``(relpath, label token)`` of one annotation line, or None when it has not the format's shape."""
        if solution:
            image_id, _, predictions = line.partition(',')
            tokens = predictions.split()
            if not image_id.strip() or not tokens or ',' in predictions:
                return None
            return f'{image_id.strip()}{_SOLUTION_IMAGE_SUFFIX}', tokens[0]
        parts = line.rsplit(maxsplit=1)
        return (parts[0].strip(), parts[1]) if len(parts) == 2 else None

    def _entry(self, ann_file: Path, line_number: int, line: str, index: int, solution: bool,
               class_indices: dict[str, int] | None) -> tuple[tuple[Path, int] | None, list[DataError]]:
        """The sample of one annotation line, or None with the problems that keep it out (in raise mode's order)."""
        entry = self._parse_entry(line, solution)
        if entry is None:
            shape = '"<ImageId>,<wnid> <box> ..."' if solution else '"<relpath> <label>"'
            return None, [DataError(f'line {line_number} is not {shape}: {line!r}', ann_file, index)]
        relpath, token = entry
        problems = []
        label = _parse_label(token, class_indices, allow_index=not solution)
        if label is None:
            problem = (f'wnid {token!r} is not among the {len(class_indices)} classes' if solution else
                       f'label {token!r} is neither a class index nor one of the {len(class_indices)} class names'
                       if class_indices else f'label {token!r} is not a non-negative class index')
            problems.append(DataError(f'line {line_number}: {problem}', ann_file, index))
        elif class_indices is not None and label >= len(class_indices):
            problems.append(DataError(f'line {line_number}: class index {label} >= num_classes '
                                      f'({len(class_indices)})', ann_file, index))
        path = self.data_root / relpath
        if not path.is_file():
            problems.append(DataError(f'line {line_number} names a missing image file {str(path)!r}', ann_file,
                                      index))
        return (None if problems else (path, label)), problems

    def _read_ann_file(self, ann_file: Path, classes: list[str] | None,
                       problems: DataProblems) -> tuple[list[str], list[tuple[Path, int]]]:
        try:
            lines = ann_file.read_text().splitlines()
        except OSError as error:
            raise DataError(f'cannot read annotation file ({error.strerror or error})', ann_file) from error
        entries = [(line_number, line) for line_number, line in enumerate(lines, start=1) if line.strip()]
        solution = bool(entries) and entries[0][1].strip() == _SOLUTION_HEADER
        if solution:
            entries = entries[1:]
            if classes is None:
                classes = _sibling_synset_mapping(ann_file)
        elif ann_file.suffix.lower() == '.csv':
            raise DataError(f'a .csv label list must start with the header line {_SOLUTION_HEADER!r} (Kaggle\'s '
                            f'LOC_val_solution.csv); line 1 is {lines[0] if lines else ""!r}', ann_file)
        class_indices = None if classes is None else {name: label for label, name in enumerate(classes)}
        samples, entry_indices = [], []
        for index, (line_number, line) in enumerate(entries):
            sample, found = self._entry(ann_file, line_number, line, index, solution, class_indices)
            if not problems.report(found):
                samples.append(sample)
                entry_indices.append(index)
        if not entries:
            problems.report(DataError('annotation file lists no images', ann_file))
        if len(samples) < len(entries):
            self._entry_indices = np.asarray(entry_indices, dtype=np.int64)
        if classes is None:
            self.anonymous_classes = True
            classes = [str(label) for label in range(max((label for _, label in samples), default=-1) + 1)]
        return classes, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        entry = index if self._entry_indices is None else int(self._entry_indices[index])
        return Sample(self.pipeline(read_image(path, entry)), label, path)


def _parse_label(token: str, class_indices: dict[str, int] | None, allow_index: bool = True) -> int | None:
    """The class index a label token names (a class name, or a non-negative integer); None when it names none."""
    if class_indices is not None and token in class_indices:
        return class_indices[token]
    if allow_index and token.isascii() and token.isdigit():
        return int(token)
    return None


def class_folder_names(folder: str | os.PathLike) -> list[str]:
    """The sorted sub-folder names of ``folder``: ImageNet's wnids, in the canonical (training) class order."""
    folder = Path(folder)
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    except OSError as error:
        raise DataError(f'cannot list class folders ({error.strerror or error})', folder) from error
    if not names:
        raise DataError('no class folders found', folder)
    return names


def read_classes(classes: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    """Class names from ``ImageFolderDataset``'s ``classes`` argument: a list, a folder of class folders, or a text
    file of one class per line (``<wnid> <description>`` lines give the wnid); duplicates are errors."""
    if classes is None:
        return None
    if isinstance(classes, (str, os.PathLike)):
        source = Path(classes)
        if source.is_dir():
            return class_folder_names(source)
        try:
            lines = source.read_text().splitlines()
        except OSError as error:
            raise DataError(f'cannot read the class list ({error.strerror or error}); classes= takes a list of '
                            f'names, a folder of class folders or a text file of names', source) from error
        numbered = [(line_number, line.strip()) for line_number, line in enumerate(lines, start=1) if line.strip()]
        # LOC_synset_mapping.txt: "n01440764 tench, Tinca tinca"; other files: the whole line is the name
        numbered = [(line_number, line.split(maxsplit=1)[0] if _WNID_LINE.match(line) else line)
                    for line_number, line in numbered]
        if not numbered:
            raise DataError('the class list names no class', source)
    else:
        source, numbered = None, list(enumerate(classes))
    first_seen = {}
    for position, name in numbered:
        if name in first_seen:
            unit = 'lines' if source else 'positions'
            raise DataError(f'class {name!r} is listed twice ({unit} {first_seen[name]} and {position})', source)
        first_seen[name] = position
    return [name for _, name in numbered]


def _sibling_synset_mapping(ann_file: Path) -> list[str]:
    mapping = ann_file.parent / _SYNSET_MAPPING
    if not mapping.is_file():
        raise DataError(f'a label list of wnids needs the class order: give classes= (the training folder, or '
                        f'{_SYNSET_MAPPING}), or put {_SYNSET_MAPPING} beside the list', ann_file)
    return read_classes(mapping)


def check_class_order(train: Dataset, val: Dataset, where: str) -> None:
    """Raise DataError unless ``val`` lists the classes of ``train`` in the same order, naming the first class that
    differs: a val label must mean the class the head learned under that index.

    Datasets without class names (no ``classes``, or :attr:`ImageFolderDataset.anonymous_classes`: labels that are
    bare indices) have nothing to compare, so pass.
    """
    train_classes, val_classes = (None if getattr(dataset, 'anonymous_classes', False)
                                  else getattr(dataset, 'classes', None) for dataset in (train, val))
    if train_classes is None or val_classes is None:
        return
    source = getattr(val, 'data_root', None)
    for index, (train_name, val_name) in enumerate(zip(train_classes, val_classes)):
        if train_name != val_name:
            raise DataError(f'{where}: class {index} is {train_name!r} in the train set but {val_name!r} in the val '
                            f'set; val labels must index the training classes in their order (give the val dataset '
                            f'classes=<the training folder>)', source, index)
    if len(train_classes) != len(val_classes):
        raise DataError(f'{where}: the train set has {len(train_classes)} classes but the val set '
                        f'{len(val_classes)}', source)
