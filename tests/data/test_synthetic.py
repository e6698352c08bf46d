import json
import logging
from pathlib import Path

import numpy as np
import pytest

from mtvision.data import synthetic
from mtvision.data.synthetic import SHAPES, ensure_synthetic, generate_synthetic, render_scene, synthetic_scene

SMALL = dict(num_train=3, num_val=3, image_size=32, num_classes=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob('*')) if path.is_file()}


def _owner_map(scene) -> np.ndarray:
    owner = np.full(scene.semantic.shape, -1)
    for index, instance in enumerate(scene.instances):
        owner[instance.mask] = index
    return owner


@pytest.mark.parametrize('seed', range(12))
def test_scene_labels_agree_with_each_other(seed):
    scene = render_scene(np.random.default_rng(seed), image_size=64, num_classes=6)
    assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
    assert 1 <= len(scene.instances) <= 4
    masks = np.stack([instance.mask for instance in scene.instances])
    assert masks.sum(axis=0).max() == 1, 'visible masks must not overlap'
    for instance in scene.instances:
        rows, cols = np.flatnonzero(instance.mask.any(axis=1)), np.flatnonzero(instance.mask.any(axis=0))
        assert instance.box == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        assert set(np.unique(scene.semantic[instance.mask]).tolist()) <= {instance.label + 1, 255}
        depths = scene.depth[instance.mask]
        assert depths.min() > 0 and np.ptp(depths) == 0, 'a shape is a flat card facing the camera'

    nearest = scene.instances[-1]
    assert (scene.semantic[nearest.mask] == nearest.label + 1).all(), 'instances run far to near'
    owner = _owner_map(scene)
    assert set(np.unique(scene.semantic[owner < 0]).tolist()) <= {0, 255}
    class_map = np.array([instance.label + 1 for instance in scene.instances] + [0])[owner]  # owner -1: ground
    # ignore pixels are exactly those next to a nearer surface of another class
    for row in range(64):
        for col in range(64):
            neighbours = [(r, c) for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1))
                          if 0 <= r < 64 and 0 <= c < 64]
            in_front = any(owner[r, c] > owner[row, col] and class_map[r, c] != class_map[row, col]
                           for r, c in neighbours)
            assert (scene.semantic[row, col] == 255) == in_front

    # per column: invalid sky on top, then ground whose depth shrinks toward the bottom of the image
    for col in range(64):
        background = owner[:, col] < 0
        column = scene.depth[:, col]
        sky_rows = np.flatnonzero(background & (column == 0))
        ground_rows = np.flatnonzero(background & (column > 0))
        assert len(ground_rows) > 0
        if len(sky_rows):
            assert sky_rows.max() < ground_rows.min()
        assert (np.diff(column[ground_rows]) <= 1e-5).all()


def test_apparent_size_shrinks_with_depth():
    sizes, depths = [], []
    for seed in range(40):
        scene = render_scene(np.random.default_rng(seed))
        for instance in scene.instances:
            x1, y1, x2, y2 = instance.box
            sizes.append(max(x2 - x1, y2 - y1))
            depths.append(scene.depth[instance.mask][0])
    # physical sizes vary only 4x, so apparent size follows 1 / depth (occlusion and framing blur it a little)
    assert np.corrcoef(np.log(sizes), np.log(depths))[0, 1] < -0.5


def test_classification_scenes_follow_the_largest_area_rule():
    for index in range(12):
        scene = synthetic_scene(0, 'classification', 'train', index)
        areas = sorted(((int(instance.mask.sum()), instance.label) for instance in scene.instances), reverse=True)
        assert areas[0][1] == scene.label == index % 6, 'classes cycle with the index so splits are balanced'
        if len(areas) > 1:
            assert areas[0][0] >= 1.2 * areas[1][0], 'the dominant shape must win clearly'


def test_same_seed_gives_identical_files_and_another_seed_other_images(tmp_path):
    def generate(name: str, seed: int) -> dict[str, bytes]:
        generate_synthetic(tmp_path / name, seed=seed, **SMALL)
        return _files(tmp_path / name)

    first, second, other = generate('a', seed=5), generate('b', seed=5), generate('c', seed=6)
    assert first == second
    images = [name for name in first if name.endswith('.jpg')]
    assert len(images) == 4 * 6
    assert all(first[name] != other.get(name) for name in images if name in other)
    assert json.loads(other['meta.json'])['seed'] == 6


def test_tasks_and_splits_draw_different_images(tiny_default):
    root, meta = tiny_default
    stems = [f'{i:06d}.jpg' for i in range(6)]
    images = [(root / meta['paths'][task][split]['img_dir'] / stem).read_bytes()
              for task in ('detection', 'segmentation', 'depth') for split in ('train', 'val') for stem in stems]
    assert len(set(images)) == len(images)


def test_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match='num_classes'):
        generate_synthetic(tmp_path / 'x', num_classes=len(SHAPES) + 1)
    with pytest.raises(ValueError, match='at least num_classes'):
        generate_synthetic(tmp_path / 'x', num_train=5, num_val=5, num_classes=6)
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'notes.txt').write_text('keep me')
    with pytest.raises(FileExistsError):
        generate_synthetic(tmp_path / 'full', **SMALL)


def test_ensure_synthetic_reuses_regenerates_and_survives_interruption(tmp_path, monkeypatch, caplog):
    root = tmp_path / 'synthetic'
    caplog.set_level(logging.INFO, logger='mtvision.data.synthetic')
    meta = ensure_synthetic(root, seed=1, **SMALL)
    assert meta == json.loads((root / 'meta.json').read_text())
    written = _files(root)

    calls = []
    real_render = synthetic.render_scene

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, 'render_scene', failing_render)
    assert ensure_synthetic(root, seed=1, **SMALL) == meta and not calls, 'same options must not regenerate'
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(root, seed=1, **dict(SMALL, num_val=4))
    assert _files(root) == written, 'an interrupted run must leave the previous dataset untouched'
    assert sorted(path.name for path in tmp_path.iterdir()) == ['synthetic'], 'no temporary directory left behind'
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path / 'fresh', seed=1, **SMALL)
    assert not (tmp_path / 'fresh').exists()
    monkeypatch.setattr(synthetic, 'render_scene', real_render)

    changed = ensure_synthetic(root, seed=1, **dict(SMALL, num_val=4))
    assert changed['num_val'] == 4
    assert len(list((root / 'depth' / 'val' / 'depth').iterdir())) == 4
    assert 'options differ' in caplog.text

    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'notes.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='no synthetic dataset'):
        ensure_synthetic(tmp_path / 'other', **SMALL)
    assert (tmp_path / 'other' / 'notes.txt').read_text() == 'keep me'


def test_make_synthetic_tool(tmp_path, load_tool):
    load_tool('make_synthetic').main(['--out', str(tmp_path / 'out'), '--seed', '2', '--num-train', '3', '--num-val',
                                      '3', '--image-size', '32', '--num-classes', '3', '--shared-images'])
    meta = json.loads((tmp_path / 'out' / 'meta.json').read_text())
    assert (meta['seed'], meta['num_train'], meta['image_size'], meta['shared_images']) == (2, 3, 32, True)
    assert len(list((tmp_path / 'out' / 'images' / 'train').iterdir())) == 3
