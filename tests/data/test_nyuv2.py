"""NYU Depth v2 as downloaded: tools/prepare_nyuv2.py on tiny files in the real formats (a MATLAB v7.3 / HDF5
``nyu_depth_v2_labeled.mat``, a MATLAB v5 ``splits.mat``, a ``mapClass`` class mapping), read back by the loaders,
trained, evaluated at the original resolution and audited."""
import math
import re
import struct
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from mtvision.data import DataError, DepthDataset, SegmentationDataset
from mtvision.engine import Trainer
from mtvision.registry import METRICS

NUM_RAW_CLASSES = 894
TRAIN, TEST = [2, 3, 5, 6], [1, 4]  # 1-based, as the official splits.mat counts


# writers of the real formats, independent of the tool's readers ------------------------------------------------

def write_labeled_mat(path: Path, rgb: np.ndarray, depth: np.ndarray, labels: np.ndarray) -> Path:
    """``nyu_depth_v2_labeled.mat`` from frames [N, H, W, 3] / [N, H, W]: HDF5 behind MATLAB v7.3's 512-byte
    header, arrays column-major as MATLAB writes them (h5py then sees [N, 3, W, H] and [N, W, H])."""
    with h5py.File(path, 'w', userblock_size=512) as file:
        file['images'] = rgb.transpose(0, 3, 2, 1)
        file['depths'] = depth.transpose(0, 2, 1)
        file['rawDepths'] = np.where(depth > 5, 0, depth).transpose(0, 2, 1).astype(np.float32)
        file['labels'] = labels.transpose(0, 2, 1)
    with open(path, 'r+b') as file:
        file.write(b'MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2012 HDF5 schema 1.00 .')
    return path


def _element(kind: int, payload: bytes) -> bytes:
    return struct.pack('<II', kind, len(payload)) + payload + b'\0' * (-len(payload) % 8)


def _matrix(name: str, mx_class: int, dims: tuple[int, ...], body: bytes) -> bytes:
    return _element(14, _element(6, struct.pack('<II', mx_class, 0)) + _element(5, struct.pack(f'<{len(dims)}i', *dims))
                    + _element(1, name.encode()) + body)


def write_mat_v5(path: Path, compress: bool = True, **variables) -> Path:
    """A MATLAB v5 file (the format of the official splits.mat, zlib-compressed like it) of column vectors stored
    as uint16 (mxUINT16), plus a cell array ``names`` as classMapping40.mat has (``className``), to be skipped."""
    header = b'MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Wed Jun  6 14:22:01 2012'.ljust(116)
    data = header + b'\0' * 8 + struct.pack('<H', 0x0100) + b'IM'
    cell_item = _matrix('', 6, (1, 1), _element(9, struct.pack('<d', 1.0)))
    elements = [_matrix('names', 1, (1, 1), cell_item)]
    for name, values in variables.items():
        values = np.asarray(values, dtype='<u2')
        elements.append(_matrix(name, 11, (len(values), 1), _element(4, values.tobytes())))
    for element in elements:
        data += struct.pack('<II', 15, len(packed := zlib.compress(element))) + packed if compress else element
    path.write_bytes(data)
    return path


def make_frames(num_frames: int, height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(num_frames, height, width, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 9.9, size=(num_frames, height, width))
    depth[rng.random(depth.shape) < 0.1] = 0.0
    labels = rng.integers(0, NUM_RAW_CLASSES + 1, size=(num_frames, height, width)).astype(np.uint16)
    return rgb, depth, labels


@pytest.fixture
def release(tmp_path):
    """The three downloaded files for 6 frames of 12x16 (height != width catches a missed transpose), and their
    contents: frames, 40-class mapping."""
    rgb, depth, labels = make_frames(6, 12, 16)
    mapping = np.random.default_rng(1).integers(1, 41, size=NUM_RAW_CLASSES)
    files = dict(mat=write_labeled_mat(tmp_path / 'nyu_depth_v2_labeled.mat', rgb, depth, labels),
                 splits=write_mat_v5(tmp_path / 'splits.mat', trainNdxs=TRAIN, testNdxs=TEST),
                 mapping=write_mat_v5(tmp_path / 'classMapping40.mat', compress=False, mapClass=mapping))
    return files, dict(rgb=rgb, depth=depth, labels=labels, mapping=mapping)


@pytest.fixture
def converted(release, tmp_path, load_tool):
    files, frames = release
    out = tmp_path / 'nyuv2'
    assert load_tool('prepare_nyuv2').main([str(files['mat']), str(files['splits']), '--out', str(out),
                                            '--class-mapping', str(files['mapping'])]) == 0
    return out, frames


def nyu_tasks(root: Path) -> dict:
    """Depth and 40-class segmentation on the converted folders, resized to the tiny model's 64x64."""
    pipeline = [dict(type='Resize', size=(64, 64), antialias=True), dict(type='ToFloat'),
                dict(type='Normalize', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))]

    def depth(split):
        return dict(type='DepthDataset', img_dir=f'{root}/{split}/rgb', depth_dir=f'{root}/{split}/depth',
                    img_suffix='.png', pipeline=pipeline)

    def seg(split):
        return dict(type='SegmentationDataset', img_dir=f'{root}/{split}/rgb', ann_dir=f'{root}/{split}/labels',
                    img_suffix='.png', num_classes=40, reduce_zero_label=True, pipeline=pipeline)

    return dict(
        depth=dict(type='depth', head=dict(type='DepthHead', max_depth=10.0), train_dataset=depth('train'),
                   val_dataset=depth('val'), batch_size=2, val_batch_size=2,
                   metric=dict(type='DepthMetric', max_depth=10.0)),
        seg=dict(type='segmentation', head=dict(type='SemanticFPNHead', num_classes=40), train_dataset=seg('train'),
                 val_dataset=seg('val'), batch_size=2, val_batch_size=2,
                 metric=dict(type='SegmentationMetric', num_classes=40)))


# the converter ----------------------------------------------------------------------------------------------------

def test_converted_files_hold_the_frames_as_stored_in_the_mat(converted):
    out, frames = converted
    for split, indices in (('train', TRAIN), ('val', TEST)):
        for kind in ('rgb', 'depth', 'labels'):
            assert sorted(path.name for path in (out / split / kind).iterdir()) == [f'{i:05d}.png' for i in indices]
        for index in indices:
            stem, frame = f'{index:05d}.png', index - 1
            rgb = cv2.cvtColor(cv2.imread(str(out / split / 'rgb' / stem)), cv2.COLOR_BGR2RGB)
            assert np.array_equal(rgb, frames['rgb'][frame]), 'lossless RGB, in RGB order, height x width'
            depth = cv2.imread(str(out / split / 'depth' / stem), cv2.IMREAD_UNCHANGED)
            assert depth.dtype == np.uint16
            assert np.array_equal(depth, np.round(frames['depth'][frame] * 1000).astype(np.uint16))
            labels = cv2.imread(str(out / split / 'labels' / stem), cv2.IMREAD_UNCHANGED)
            raw = frames['labels'][frame].astype(np.int64)
            expected = np.where(raw == 0, 0, frames['mapping'][raw - 1])
            assert labels.dtype == np.uint8 and np.array_equal(labels, expected)
    assert [path.name for path in out.parent.iterdir() if path.name.startswith('.')] == [], 'no temporary left'


def test_loaders_read_the_converted_folders(converted):
    out, frames = converted
    depth = DepthDataset(out / 'val' / 'rgb', out / 'val' / 'depth', img_suffix='.png')
    image, target = depth[1]
    assert image.shape == (3, 12, 16) and target.shape == (1, 12, 16)
    stored = np.round(frames['depth'][TEST[1] - 1] * 1000) / 1000
    np.testing.assert_allclose(target[0].numpy(), stored, rtol=1e-6)
    torch.testing.assert_close(depth.original_target(1), target)
    seg = SegmentationDataset(out / 'val' / 'rgb', out / 'val' / 'labels', num_classes=40, img_suffix='.png',
                              reduce_zero_label=True)
    raw = frames['labels'][TEST[1] - 1].astype(np.int64)
    expected = np.where(raw == 0, 255, frames['mapping'][raw - 1] - 1)
    assert np.array_equal(seg[1][1].numpy(), expected)


def test_raw_labels_rawdepths_jpeg_and_a_text_mapping(release, tmp_path, load_tool):
    files, frames = release
    tool = load_tool('prepare_nyuv2')
    tool.main([str(files['mat']), str(files['splits']), '--out', str(tmp_path / 'raw'), '--depth-key', 'rawDepths',
               '--image-format', 'jpg'])
    labels = cv2.imread(str(tmp_path / 'raw' / 'train' / 'labels' / '00002.png'), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16 and np.array_equal(labels, frames['labels'][1])
    depth = cv2.imread(str(tmp_path / 'raw' / 'train' / 'depth' / '00002.png'), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(depth == 0, (frames['depth'][1] > 5) | (frames['depth'][1] == 0))
    assert (tmp_path / 'raw' / 'train' / 'rgb' / '00002.jpg').is_file()

    text = tmp_path / 'mapping40.txt'
    text.write_text(', '.join(map(str, frames['mapping'][:500])) + '\n' + ' '.join(map(str, frames['mapping'][500:])))
    tool.main([str(files['mat']), str(files['splits']), '--out', str(tmp_path / 'text'), '--class-mapping', str(text)])
    tool.main([str(files['mat']), str(files['splits']), '--out', str(tmp_path / 'mat'),
               '--class-mapping', str(files['mapping'])])
    for index in TEST:
        name = f'val/labels/{index:05d}.png'
        assert np.array_equal(cv2.imread(str(tmp_path / 'text' / name), cv2.IMREAD_UNCHANGED),
                              cv2.imread(str(tmp_path / 'mat' / name), cv2.IMREAD_UNCHANGED))


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert [path.name for path in out.parent.iterdir() if path.name.startswith(f'.{out.name}')] == []


def test_bad_inputs_name_the_file_and_write_nothing(release, tmp_path, load_tool):
    files, frames = release
    convert = load_tool('prepare_nyuv2').convert
    out = tmp_path / 'out'
    with pytest.raises(DataError, match=re.escape(repr(str(tmp_path / 'none.mat'))) + '.*trainNdxs and testNdxs'):
        convert(files['mat'], tmp_path / 'none.mat', out)
    no_test = write_mat_v5(tmp_path / 'no_test.mat', trainNdxs=TRAIN)
    with pytest.raises(DataError, match=re.escape(repr(str(no_test))) + ': has no numeric variable testNdxs'):
        convert(files['mat'], no_test, out)
    beyond = write_mat_v5(tmp_path / 'beyond.mat', trainNdxs=TRAIN, testNdxs=[1, 7])
    with pytest.raises(DataError, match=r'testNdxs holds \[7\], outside 1..6'):
        convert(files['mat'], beyond, out)
    overlap = write_mat_v5(tmp_path / 'overlap.mat', trainNdxs=TRAIN, testNdxs=[1, 2])
    with pytest.raises(DataError, match=r'frames \[2\] are in both'):
        convert(files['mat'], overlap, out)
    text_split = tmp_path / 'splits.txt'
    text_split.write_text('1 2 3')
    with pytest.raises(DataError, match='not a little-endian MATLAB v5 or v7.3 file'):
        convert(files['mat'], text_split, out)

    # a mapping of 40 entries does not cover raw labels above 40: found while writing, after some files were
    short = write_mat_v5(tmp_path / 'short.mat', mapClass=np.arange(1, 41))
    first_label = np.unique(frames['labels'][TRAIN[0] - 1][frames['labels'][TRAIN[0] - 1] > 40])[0]
    with pytest.raises(DataError, match=re.escape(f"{str(short)!r}, index {TRAIN[0]}: the class mapping has 40 "
                                                  f"entries but frame {TRAIN[0]} has label {first_label}")):
        convert(files['mat'], files['splits'], out, class_mapping=short)
    assert_nothing_written(out)
    bad_text = tmp_path / 'bad.txt'
    bad_text.write_text('1 2 x')
    with pytest.raises(DataError, match=re.escape(repr(str(bad_text))) + ': cannot read it'):
        convert(files['mat'], files['splits'], out, class_mapping=bad_text)
    bad_text.write_text('1 2.5 3')
    with pytest.raises(DataError, match='not all integers in 0..65535'):
        convert(files['mat'], files['splits'], out, class_mapping=bad_text)

    with h5py.File(tmp_path / 'no_labels.mat', 'w') as file:
        file['images'] = frames['rgb'].transpose(0, 3, 2, 1)
        file['depths'] = frames['depth'].transpose(0, 2, 1)
    with pytest.raises(DataError, match='has no dataset labels'):
        convert(tmp_path / 'no_labels.mat', files['splits'], out)
    with pytest.raises(DataError, match='cannot open it as HDF5'):
        convert(files['splits'], files['splits'], out)
    assert_nothing_written(out)
    out.mkdir()
    with pytest.raises(FileExistsError, match='exists'):
        convert(files['mat'], files['splits'], out)


# training, evaluation, audit ----------------------------------------------------------------------------------

def test_converted_data_trains_and_evaluates(converted, tiny_config, tmp_path):
    out, _ = converted
    cfg = tiny_config(**{'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2})
    cfg.tasks = nyu_tasks(out)
    results = Trainer(cfg, tmp_path / 'work').train()
    assert {'abs_rel', 'silog', 'delta3'} <= set(results['depth'])
    assert all(math.isfinite(value) for value in results['depth'].values())
    assert math.isfinite(results['seg']['mIoU'])


def test_eigen_crop_metrics_at_the_original_resolution(tmp_path, load_tool):
    """Frames of NYUv2's real 480x640, scored on the ground truth as stored against a numpy reference written from
    the protocol's definition (BTS's compute_errors, valid in (1e-3, 10) m, rows 45:471 and columns 41:601)."""
    rgb, depth, labels = make_frames(2, 480, 640, seed=5)
    depth[0, :40] = 12.0  # beyond NYUv2's 10 m cap: left out
    mat = write_labeled_mat(tmp_path / 'nyu_depth_v2_labeled.mat', rgb, depth, labels)
    splits = write_mat_v5(tmp_path / 'splits.mat', trainNdxs=[1], testNdxs=[2])
    load_tool('prepare_nyuv2').main([str(mat), str(splits), '--out', str(tmp_path / 'nyuv2')])
    dataset = DepthDataset(tmp_path / 'nyuv2' / 'val' / 'rgb', tmp_path / 'nyuv2' / 'val' / 'depth',
                           img_suffix='.png')
    # the ground truth as stored (millimetres) and read (float32 metres)
    gt = (np.round(depth[1] * 1000).astype(np.float32) / np.float32(1000)).astype(np.float64)
    prediction = gt * np.random.default_rng(6).lognormal(0.0, 0.2, size=gt.shape) + 0.05
    prediction[:45] = 100.0  # outside the crop: must not count

    metric = METRICS.build(dict(type='DepthMetric', max_depth=10.0, crop='eigen'))
    metric.update(torch.from_numpy(prediction)[None, None], dataset.original_target(0)[None].double())
    valid = (gt > 1e-3) & (gt < 10.0)
    box = np.zeros_like(valid)
    box[45:471, 41:601] = True
    g, p = gt[valid & box], np.clip(prediction[valid & box], 1e-3, 10.0)
    ratio, e = np.maximum(g / p, p / g), np.log(p) - np.log(g)
    expected = dict(abs_rel=np.mean(np.abs(g - p) / g), sq_rel=np.mean((g - p) ** 2 / g),
                    rmse=np.sqrt(np.mean((g - p) ** 2)), rmse_log=np.sqrt(np.mean(e ** 2)),
                    log10=np.mean(np.abs(np.log10(p) - np.log10(g))),
                    silog=100 * np.sqrt(np.mean(e ** 2) - np.mean(e) ** 2),
                    delta1=np.mean(ratio < 1.25), delta2=np.mean(ratio < 1.25 ** 2),
                    delta3=np.mean(ratio < 1.25 ** 3))
    assert metric.compute() == pytest.approx(expected, rel=1e-6)




def test_check_data_on_the_converted_folders(converted, tmp_path, capsys, restore_logging, load_tool):
    out, _ = converted
    config = tmp_path / 'config.py'
    config.write_text(f'tasks = {nyu_tasks(out)!r}\n')
    tool = load_tool('check_data')
    assert tool.main([str(config)]) == 0
    assert capsys.readouterr().out.strip() == 'no problems found'
    deleted = out / 'val' / 'depth' / f'{TEST[1]:05d}.png'
    deleted.unlink()
    assert tool.main([str(config)]) == 1
    printed = capsys.readouterr().out
    assert str(deleted) in printed and printed.rstrip().endswith('1 error and 0 warnings in 1 dataset')
