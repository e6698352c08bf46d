"""Tiny replicas of the two ImageNet-1k downloads, with their real folder names, file names and list formats.

- mmpretrain's layout: ``train/<wnid>/<wnid>_<k>.JPEG``, the flat ``val/ILSVRC2012_val_<8 digits>.JPEG`` and
  ``meta/val.txt`` of ``<file name> <class index>`` lines (index into the sorted wnids).
- Kaggle's (``imagenet-object-localization-challenge``): ``ILSVRC/Data/CLS-LOC/{train/<wnid>,val}/``,
  ``LOC_val_solution.csv`` (``ImageId,PredictionString``: wnid and box, repeated per object, rows unsorted) and
  ``LOC_synset_mapping.txt`` (``<wnid> <description>`` in class order).

Used by tests/data/test_imagenet_layouts.py and tests/probe/test_imagenet_val_lists.py, which load it by path
(pytest runs with --import-mode=importlib, so test modules cannot import their neighbours).
"""
from pathlib import Path

import cv2
import numpy as np

# the first three of ImageNet-1k's classes, in the canonical (sorted wnid) order
WNIDS = ('n01440764', 'n01443537', 'n01484850')
DESCRIPTIONS = ('tench, Tinca tinca', 'goldfish, Carassius auratus',
                'great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias')
TRAIN_PER_CLASS = 3
VAL_LABELS = (2, 0, 1, 1, 0, 2)  # class index of ILSVRC2012_val_00000001.JPEG, ..._00000006.JPEG
# BGR colour of each class: a trivially separable dataset
COLOURS = ((40, 40, 220), (40, 200, 40), (220, 60, 40))


def val_name(number: int) -> str:
    """ImageNet's validation file stem, numbered from 1."""
    return f'ILSVRC2012_val_{number:08d}'


def write_jpeg(path: Path, label: int, seed: int) -> Path:
    """A small JPEG of class ``label``'s colour with some noise (a non-square one, as most ImageNet photos)."""
    noise = np.random.default_rng(seed).integers(-20, 21, size=(18, 24, 3))
    image = np.clip(np.array(COLOURS[label]) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def write_train_folders(train: Path) -> list[tuple[Path, int]]:
    samples = []
    for label, wnid in enumerate(WNIDS):
        for k in range(TRAIN_PER_CLASS):
            samples.append((write_jpeg(train / wnid / f'{wnid}_{k + 1}.JPEG', label, 100 * label + k), label))
    return samples


def write_flat_val(val: Path) -> list[tuple[Path, int]]:
    return [(write_jpeg(val / f'{val_name(number)}.JPEG', label, 1000 + number), label)
            for number, label in enumerate(VAL_LABELS, start=1)]


def make_mmpretrain_layout(root: Path) -> dict:
    """``root/{train,val,meta/val.txt}``; returns the paths and the expected val samples."""
    train, val, ann_file = root / 'train', root / 'val', root / 'meta' / 'val.txt'
    train_samples, val_samples = write_train_folders(train), write_flat_val(val)
    ann_file.parent.mkdir(parents=True)
    ann_file.write_text(''.join(f'{path.name} {label}\n' for path, label in val_samples))
    return dict(train=train, val=val, ann_file=ann_file, train_samples=train_samples, val_samples=val_samples)


def make_kaggle_layout(root: Path) -> dict:
    """``root/ILSVRC/Data/CLS-LOC/{train,val}``, ``root/LOC_val_solution.csv``, ``root/LOC_synset_mapping.txt``."""
    images = root / 'ILSVRC' / 'Data' / 'CLS-LOC'
    train, val = images / 'train', images / 'val'
    train_samples, val_samples = write_train_folders(train), write_flat_val(val)
    rows = []
    for number, label in enumerate(VAL_LABELS, start=1):
        boxes = [f'{WNIDS[label]} 2 3 15 11'] * (1 + number % 2)  # one or two objects, as in the real file
        rows.append(f'{val_name(number)},{" ".join(boxes)} ')
    rows = rows[3:] + rows[:3]  # the real file is not in image order
    ann_file = root / 'LOC_val_solution.csv'
    ann_file.write_text('ImageId,PredictionString\n' + '\n'.join(rows) + '\n')
    mapping = root / 'LOC_synset_mapping.txt'
    mapping.write_text(''.join(f'{wnid} {description}\n' for wnid, description in zip(WNIDS, DESCRIPTIONS)))
    return dict(train=train, val=val, ann_file=ann_file, mapping=mapping, train_samples=train_samples,
                val_samples=val_samples[3:] + val_samples[:3])


LAYOUTS = dict(mmpretrain=make_mmpretrain_layout, kaggle=make_kaggle_layout)
