"""Convert NYU Depth v2's labelled release into the folders that DepthDataset and SegmentationDataset read.

    python tools/prepare_nyuv2.py nyu_depth_v2_labeled.mat splits.mat --out data/nyuv2
                                  [--class-mapping classMapping40.mat] [--depth-key depths|rawDepths]
                                  [--image-format png|jpg]

Inputs, both from the NYU Depth v2 page (https://cs.nyu.edu/~fergus/datasets/nyu_depth_v2.html):

- ``nyu_depth_v2_labeled.mat``: a MATLAB v7.3 (HDF5) file of 1449 aligned 480x640 frames. MATLAB stores arrays
  column-major, so h5py sees ``images`` as [N, 3, W, H] uint8, ``depths`` / ``rawDepths`` as [N, W, H] float
  metres and ``labels`` as [N, W, H] class ids (0 = unlabelled, 1..894); each frame is transposed back to
  [H, W(, 3)], as the common converters do (``image.T``, ``depth.T`` in cleinc/bts
  utils/extract_official_train_test_set_from_mat.py). ``depths`` is the in-painted map; ``rawDepths`` the
  projected sensor depth with holes (what BTS's official-test extraction writes).
- ``splits.mat``: the official split, MATLAB v5 variables ``trainNdxs`` (795) and ``testNdxs`` (654) of
  1-based frame indices. The test frames go to ``val``.

Output (written to a temporary sibling folder and renamed into place at the end, so an interrupted or failed run
leaves nothing that looks complete; an existing ``--out`` is never overwritten)::

    <out>/{train,val}/rgb/<index>.png      RGB, lossless by default so that evaluation sees the dataset's pixels
    <out>/{train,val}/depth/<index>.png    uint16 millimetres (metres * 1000, rounded), 0 = no measurement
    <out>/{train,val}/labels/<index>.png   class ids, 0 = unlabelled: uint16 raw ids, or mapped (uint8 if all fit)

``<index>`` is the frame's 1-based index in the .mat, zero-padded to 5 digits (``00001``), the numbering of
``splits.mat``. ``--class-mapping`` maps the 894 raw classes to a smaller set: a .mat file with the variable
``mapClass`` (e.g. the 40-class ``classMapping40.mat`` of Gupta et al., MATLAB v5 or v7.3), or a text file of
target ids, the i-th for raw class i, separated by whitespace or commas. Label 0 stays 0 (unlabelled).
"""
import argparse
import os
import shutil
import struct
import sys
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from mtvision.data.errors import DataError

SPLITS = {'train': 'trainNdxs', 'val': 'testNdxs'}
DEPTH_KEYS = ('depths', 'rawDepths')
MILLIMETRES_PER_METRE = 1000.0

# MATLAB v5 data element types (MAT-File Format, MathWorks), as numpy dtypes; little-endian files only
_MAT_NUMERIC = {1: 'i1', 2: 'u1', 3: '<i2', 4: '<u2', 5: '<i4', 6: '<u4', 7: '<f4', 9: '<f8', 12: '<i8', 13: '<u8'}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MX_NUMERIC_CLASSES = range(6, 16)  # double, single, int8 ... uint64


def _require_h5py():
    try:
        import h5py
    except ImportError as error:
        raise ImportError('reading MATLAB v7.3 files (nyu_depth_v2_labeled.mat) needs h5py: pip install h5py') \
            from error
    return h5py


def _mat_elements(buffer: bytes):
    """``(type, payload)`` of each MATLAB v5 data element in ``buffer``."""
    offset = 0
    while offset + 8 <= len(buffer):
        kind, size = struct.unpack_from('<II', buffer, offset)
        if kind >> 16:  # small element: type and size share the first 4 bytes, the data the next 4
            kind, size = kind & 0xFFFF, kind >> 16
            yield kind, buffer[offset + 4:offset + 4 + size]
            offset += 8
            continue
        yield kind, buffer[offset + 8:offset + 8 + size]
        # elements are padded to 8 bytes, except compressed ones
        offset += 8 + size + (0 if kind == _MI_COMPRESSED else -size % 8)


def _mat_v5_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The numeric arrays of a MATLAB v5 file by name (cells, structs, strings are skipped)."""
    arrays = {}
    for kind, payload in _mat_elements(data[128:]):
        if kind == _MI_COMPRESSED:
            kind, payload = next(_mat_elements(zlib.decompress(payload)))
        if kind != _MI_MATRIX:
            continue
        parts = list(_mat_elements(payload))  # array flags, dimensions, name, real part, ...
        mx_class = struct.unpack_from('<I', parts[0][1])[0] & 0xFF
        if mx_class in _MX_NUMERIC_CLASSES and len(parts) >= 4:
            shape = np.frombuffer(parts[1][1], '<i4')
            values = np.frombuffer(parts[3][1], _MAT_NUMERIC[parts[3][0]])
            arrays[bytes(parts[2][1]).decode('ascii')] = values.reshape(shape, order='F')
    return arrays


def read_mat(path: str | os.PathLike, names: Sequence[str], expected: str) -> dict[str, np.ndarray]:
    """The numeric variables ``names`` of a MATLAB v5 or v7.3 file; DataError naming the file and ``expected``
    (what it should hold) when it is missing, unreadable or lacks one of them."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f'file is missing; expected {expected}', path)
    data = path.read_bytes()
    try:
        if data.startswith(b'MATLAB 7.3 MAT-file'):
            with _require_h5py().File(path, 'r') as file:
                arrays = {name: np.asarray(file[name]).T for name in names if name in file}
        elif data.startswith(b'MATLAB 5.0 MAT-file') and data[126:128] == b'IM':
            arrays = _mat_v5_arrays(data)
        else:
            raise ValueError('not a little-endian MATLAB v5 or v7.3 file')
    except (ValueError, KeyError, IndexError, struct.error, zlib.error, OSError) as error:
        raise DataError(f'cannot read it ({error}); expected {expected}', path) from error
    missing = [name for name in names if name not in arrays]
    if missing:
        raise DataError(f'has no numeric variable {", ".join(missing)}; expected {expected}', path)
    return {name: arrays[name] for name in names}


def read_splits(path: str | os.PathLike, num_frames: int) -> dict[str, np.ndarray]:
    """``{'train': indices, 'val': indices}``, 1-based, from the official ``splits.mat``; DataError naming the
    file when a variable is missing, holds non-integers, indices outside 1..num_frames, repeats, or overlaps."""
    expected = (f'MATLAB v5 variables {" and ".join(SPLITS.values())} of 1-based frame indices (the official '
                f'NYUv2 splits.mat)')
    arrays = read_mat(path, list(SPLITS.values()), expected)
    splits = {}
    for split, name in SPLITS.items():
        values = arrays[name].ravel()
        indices = values.astype(np.int64)
        if values.size == 0 or not np.array_equal(indices, values):
            raise DataError(f'{name} must be a non-empty list of integers; expected {expected}', path)
        outside = indices[(indices < 1) | (indices > num_frames)]
        if outside.size:
            raise DataError(f'{name} holds {outside[:5].tolist()}, outside 1..{num_frames} (the frames of the '
                            f'.mat); expected {expected}', path)
        if len(np.unique(indices)) < len(indices):
            raise DataError(f'{name} lists a frame twice; expected {expected}', path)
        splits[split] = np.sort(indices)
    shared = np.intersect1d(*splits.values())
    if shared.size:
        raise DataError(f'frames {shared[:5].tolist()} are in both {" and ".join(SPLITS.values())}', path)
    return splits


def read_class_mapping(path: str | os.PathLike) -> np.ndarray:
    """A lookup table ``table[raw_label] = target``: ``table[0] = 0`` (unlabelled), then the file's entries.

    A ``.mat`` file gives its variable ``mapClass``; any other file is read as text, integers separated by
    whitespace or commas. DataError naming the file when it is unreadable or holds other than integers 0..65535.
    """
    path = Path(path)
    expected = 'target class ids in 0..65535, the i-th for raw NYUv2 class i (1..894)'
    if path.suffix.lower() == '.mat':
        values = read_mat(path, ['mapClass'], f'the variable mapClass: {expected}')['mapClass'].ravel()
    else:
        if not path.is_file():
            raise DataError(f'file is missing; expected {expected}', path)
        words = path.read_text(errors='replace').replace(',', ' ').split()
        try:
            values = np.array([float(word) for word in words])
        except ValueError as error:
            raise DataError(f'cannot read it ({error}); expected {expected}', path) from error
    if values.size == 0 or not np.array_equal(values, values.astype(np.int64)) or values.min() < 0 \
            or values.max() > np.iinfo(np.uint16).max:
        raise DataError(f'holds {values.size} values, not all integers in 0..65535; expected {expected}', path)
    return np.concatenate([[0], values.astype(np.int64)])


def to_millimetres(depth: np.ndarray, source: Path, index: int) -> np.ndarray:
    """Metres to uint16 millimetres, rounded; non-finite or non-positive depth becomes 0 (no measurement)."""
    millimetres = np.rint(np.where(np.isfinite(depth) & (depth > 0), depth, 0.0) * MILLIMETRES_PER_METRE)
    if millimetres.max(initial=0) > np.iinfo(np.uint16).max:
        raise DataError(f'depth {millimetres.max() / MILLIMETRES_PER_METRE:g} m does not fit uint16 millimetres',
                        source, index)
    return millimetres.astype(np.uint16)


def _write(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise OSError(f'cannot write {path}')


def convert(mat_file: str | os.PathLike, split_file: str | os.PathLike, out: str | os.PathLike,
            class_mapping: str | os.PathLike | None = None, depth_key: str = 'depths',
            image_format: str = 'png') -> dict[str, int]:
    """Write the layout described in this module's docstring to ``out``; returns the frame count per split.

    DataError (naming the file, and the 1-based frame index where one applies) for a missing or malformed input,
    a label the class mapping does not cover, or a depth that does not fit; FileExistsError when ``out`` exists.
    """
    if depth_key not in DEPTH_KEYS:
        raise ValueError(f'depth_key must be one of {DEPTH_KEYS}, got {depth_key!r}')
    mat_file, out = Path(mat_file), Path(out)
    if out.exists():
        raise FileExistsError(f'{out} exists; remove it or choose another output folder')
    table = None if class_mapping is None else read_class_mapping(class_mapping)
    h5py = _require_h5py()
    if not mat_file.is_file():
        raise DataError('file is missing; expected NYUv2\'s nyu_depth_v2_labeled.mat', mat_file)
    try:
        file = h5py.File(mat_file, 'r')
    except OSError as error:
        raise DataError(f'cannot open it as HDF5 (MATLAB v7.3) ({error})', mat_file) from error
    with file:
        missing = [key for key in ('images', depth_key, 'labels') if key not in file]
        if missing:
            raise DataError(f'has no dataset {", ".join(missing)}; expected NYUv2\'s nyu_depth_v2_labeled.mat',
                            mat_file)
        images, depths, labels = file['images'], file[depth_key], file['labels']
        num_frames, _, width, height = images.shape if images.ndim == 4 else (0, 0, 0, 0)
        if images.ndim != 4 or images.shape[1] != 3 or not depths.shape == labels.shape == (num_frames, width, height):
            raise DataError(f'images {images.shape}, {depth_key} {depths.shape} and labels {labels.shape} are not '
                            f'[N, 3, W, H], [N, W, H] and [N, W, H] (MATLAB\'s column-major order)', mat_file)
        splits = read_splits(split_file, num_frames)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
        try:
            for split, indices in splits.items():
                folders = {kind: staging / split / kind for kind in ('rgb', 'depth', 'labels')}
                for folder in folders.values():
                    folder.mkdir(parents=True)
                for index in indices.tolist():
                    stem = f'{index:05d}'
                    rgb = np.ascontiguousarray(images[index - 1].transpose(2, 1, 0))
                    _write(folders['rgb'] / f'{stem}.{image_format}', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                    _write(folders['depth'] / f'{stem}.png', to_millimetres(depths[index - 1].T, mat_file, index))
                    _write(folders['labels'] / f'{stem}.png', map_labels(labels[index - 1].T, table,
                                                                          class_mapping, index))
            os.rename(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {split: len(indices) for split, indices in splits.items()}


def map_labels(labels: np.ndarray, table: np.ndarray | None, mapping_file, index: int) -> np.ndarray:
    """Raw NYUv2 class ids through the mapping ``table`` (raw ids as uint16 without one); DataError naming the
    mapping file, the label and the frame when the mapping does not cover a label present in the frame."""
    labels = labels.astype(np.int64)
    if table is None:
        return labels.astype(np.uint16)
    uncovered = np.unique(labels[labels >= len(table)])
    if uncovered.size:
        raise DataError(f'the class mapping has {len(table) - 1} entries but frame {index} has label '
                        f'{uncovered[0]}' + (f' (and {uncovered[1:6].tolist()})' if uncovered.size > 1 else ''),
                        mapping_file, index)
    return table[labels].astype(np.uint8 if table.max() <= np.iinfo(np.uint8).max else np.uint16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('mat_file', help='nyu_depth_v2_labeled.mat (MATLAB v7.3 / HDF5)')
    parser.add_argument('split_file', help='the official splits.mat (trainNdxs, testNdxs)')
    parser.add_argument('--out', required=True, help='output folder; must not exist yet')
    parser.add_argument('--class-mapping', help='mapClass .mat (e.g. classMapping40.mat) or a text list of '
                                                '894 target ids; default: the raw 894 class ids')
    parser.add_argument('--depth-key', choices=DEPTH_KEYS, default='depths',
                        help='in-painted depths (default) or rawDepths (sensor depth with holes, 0 = invalid)')
    parser.add_argument('--image-format', choices=('png', 'jpg'), default='png',
                        help='RGB file format (default: png, lossless)')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = convert(args.mat_file, args.split_file, args.out, args.class_mapping, args.depth_key,
                     args.image_format)
    print(f'wrote {counts["train"]} train and {counts["val"]} val frames to {args.out}')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except (DataError, FileExistsError, ImportError) as error:
        sys.exit(f'prepare_nyuv2: {error}')
