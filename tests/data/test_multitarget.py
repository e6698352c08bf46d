import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from mtvision.data import synthetic
from mtvision.data.datasets import DenseMultiTaskDataset, MultiLabelImageList
from mtvision.data.errors import DataError
from mtvision.data.surface_normals import SurfaceNormals, decode_normals, encode_normals
from mtvision.data.synthetic import generate_synthetic, render_scene, synthetic_scene
from mtvision.data.transforms import build_pipeline
from mtvision.registry import DATASETS

SIZE = 16
OBJECT = (slice(3, 9), slice(2, 6))  # rows, cols of a square card in the left half
OBJECT_NORMAL = (0.6, 0.0, -0.8)
GROUND_NORMAL = (0.0, -1.0, 0.0)


def _write_rgb_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _known_sample(root: Path) -> dict[str, np.ndarray]:
    """One 16x16 sample whose object lies at OBJECT in every map; the top two rows have no depth (sky)."""
    image = np.full((SIZE, SIZE, 3), 40, dtype=np.uint8)
    image[OBJECT] = 220
    labels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    labels[OBJECT] = 3
    depth = np.full((SIZE, SIZE), 5.0, dtype=np.float32)
    depth[OBJECT] = 2.0
    depth[:2] = 0
    normals = np.broadcast_to(np.float32(GROUND_NORMAL), (SIZE, SIZE, 3)).copy()
    normals[OBJECT] = OBJECT_NORMAL
    normals[:2] = 0
    _write_rgb_png(root / 'images' / 'a.png', image)
    (root / 'seg').mkdir()
    cv2.imwrite(str(root / 'seg' / 'a.png'), labels)
    (root / 'depth').mkdir()
    cv2.imwrite(str(root / 'depth' / 'a.png'), np.round(depth * 1000).astype(np.uint16))
    _write_rgb_png(root / 'normals' / 'a.png', encode_normals(normals))
    return dict(image=image, labels=labels, depth=depth, normals=decode_normals(encode_normals(normals)))


def _dataset(root: Path, pipeline=(), **kwargs) -> DenseMultiTaskDataset:
    return DenseMultiTaskDataset(root / 'images', pipeline=pipeline, seg_dir=root / 'seg', depth_dir=root / 'depth',
                                 normal_dir=root / 'normals', num_classes=4, img_suffix='.png', **kwargs)


def _nearest_upsample(array: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(array, factor, axis=-2), factor, axis=-1)


def test_flip_and_resize_keep_every_target_aligned(tmp_path):
    stored = _known_sample(tmp_path)
    flip_and_double = [dict(type='RandomHorizontalFlip', p=1.0), dict(type='Resize', size=(2 * SIZE, 2 * SIZE))]
    image, targets = _dataset(tmp_path, flip_and_double)[0]
    assert isinstance(targets['normals'], SurfaceNormals) and isinstance(targets['depth'], tv_tensors.Mask)

    # reference: numpy's flip, then each pixel repeated 2x2 (what a pixel-centred nearest resize does at 2x)
    def expected(array: np.ndarray) -> np.ndarray:
        return _nearest_upsample(np.flip(array, axis=-1), 2)

    assert torch.equal(targets['segmentation'], torch.from_numpy(expected(stored['labels']).astype(np.int64)))
    assert torch.allclose(targets['depth'], torch.from_numpy(expected(stored['depth'])[None]), atol=1e-3)
    flipped_normals = expected(stored['normals']) * np.array([-1, 1, 1], dtype=np.float32)[:, None, None]
    assert torch.allclose(targets['normals'], torch.from_numpy(flipped_normals), atol=1e-6)
    # the object, mirrored into the right half, is where the image is bright, and faces the other way
    bright = (image.float().mean(0) > 130).numpy()
    on_object = (targets['segmentation'] == 3).numpy()
    assert on_object.any() and not on_object[:, :SIZE].any()
    assert (bright == on_object).mean() > 0.95
    assert np.allclose(targets['normals'][0].numpy()[on_object], -OBJECT_NORMAL[0], atol=0.01)
    assert (targets['depth'][0].numpy()[on_object] == 2.0).all()


def test_vertical_flip_negates_y_and_padding_marks_normals_invalid():
    normals = SurfaceNormals(torch.tensor(GROUND_NORMAL).view(3, 1, 1).expand(3, 4, 4).clone())
    image = tv_tensors.Image(torch.zeros(3, 4, 4, dtype=torch.uint8))
    _, flipped = build_pipeline([dict(type='RandomVerticalFlip', p=1.0)])(image, normals)
    assert torch.equal(flipped[1], torch.ones(4, 4))
    _, padded = build_pipeline([dict(type='Pad', padding=1, fill=dict(Image=0, Mask=255))])(image, normals)
    assert padded.shape == (3, 6, 6) and padded[:, 0].abs().sum() == 0 and torch.equal(padded[:, 1:-1, 1:-1],
                                                                                       normals)


@pytest.mark.parametrize('transform', [dict(type='RandomRotation', degrees=10),
                                       dict(type='RandomAffine', degrees=0, shear=10),
                                       dict(type='Pad', padding=1, padding_mode='reflect')])
def test_transforms_that_would_need_rotated_vectors_are_refused(transform):
    normals = SurfaceNormals(torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match='SurfaceNormals'):
        build_pipeline([transform])(tv_tensors.Image(torch.zeros(3, 4, 4, dtype=torch.uint8)), normals)


def test_encoding_round_trips_and_keeps_invalid_apart():
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(8, 8, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[0] = 0
    normals[1, 0] = (-1, 0, 0)  # encodes a 0 channel, but not the all-zero pixel
    decoded = decode_normals(encode_normals(normals)).transpose(1, 2, 0)
    assert np.abs(decoded - normals).max() < 0.01
    assert (decoded[0] == 0).all() and (decoded[1:] != 0).any(axis=-1).all()


def _back_projected_normals(depth: np.ndarray, camera) -> np.ndarray:
    """Normals by finite differences of the back-projected depth map (as NYUv2 toolboxes compute them): the
    cross product of the 3-D steps to the right and downward neighbours, turned toward the camera."""
    ys, xs = np.mgrid[0:depth.shape[0], 0:depth.shape[1]].astype(np.float64)
    points = np.stack([(xs - depth.shape[1] / 2) * depth / camera.focal,
                       (ys - camera.horizon) * depth / camera.focal, depth.astype(np.float64)], axis=-1)
    normals = np.cross(points[:-1, 1:] - points[:-1, :-1], points[1:, :-1] - points[:-1, :-1])
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
    return np.where((np.sum(normals * points[:-1, :-1], axis=-1) > 0)[..., None], -normals, normals)


@pytest.mark.parametrize('seed', range(6))
def test_synthetic_normals_match_the_geometry(seed):
    scene = render_scene(np.random.default_rng(seed), image_size=64, num_classes=6)
    camera = synthetic._sample_camera(np.random.default_rng(seed), 64)  # the first draw of render_scene
    on_shape = np.any([instance.mask for instance in scene.instances], axis=0)
    ground = (scene.depth > 0) & ~on_shape
    # ground with its right and lower neighbours: the finite differences stay on the plane
    inner = ground[:-1, :-1] & ground[1:, :-1] & ground[:-1, 1:]
    assert inner.sum() > 100
    reference = _back_projected_normals(scene.depth, camera)
    assert np.abs(reference[inner] - scene.normals[:-1, :-1][inner]).max() < 1e-3
    assert np.allclose(scene.normals[ground], camera.ground_normal)
    assert (scene.normals[on_shape] == (0, 0, -1)).all()
    assert (scene.normals[scene.depth == 0] == 0).all()


def test_shared_layout_loads_all_dense_targets(tiny_shared):
    root, meta = tiny_shared
    paths = meta['paths']
    dataset = DATASETS.build(dict(
        type='DenseMultiTaskDataset', img_dir=root / paths['normals']['val']['img_dir'],
        seg_dir=root / paths['segmentation']['val']['ann_dir'], depth_dir=root / paths['depth']['val']['depth_dir'],
        normal_dir=root / paths['normals']['val']['normal_dir'], num_classes=len(meta['segmentation_classes'])))
    assert len(dataset) == meta['num_val'] and dataset.tasks == ('segmentation', 'depth', 'normals')
    for index in range(len(dataset)):
        scene = synthetic_scene(meta['seed'], 'shared', 'val', index, meta['image_size'], meta['num_classes'])
        _, targets = dataset[index]
        assert torch.equal(targets['segmentation'], torch.from_numpy(scene.semantic.astype(np.int64)))
        assert torch.allclose(targets['depth'][0], torch.from_numpy(scene.depth), atol=6e-4)
        assert np.abs(targets['normals'].numpy().transpose(1, 2, 0) - scene.normals).max() < 0.01
        original = dataset.original_target(index)
        assert original.keys() == targets.keys()
        assert all(torch.equal(original[task], targets[task].as_subclass(torch.Tensor)) for task in targets)
        assert torch.equal(dataset.original_target(index, 'depth'), original['depth'])


def test_multilabel_lists_hold_the_classes_of_the_segmentation_maps(tiny_shared):
    root, meta = tiny_shared
    for split in ('train', 'val'):
        paths = {key: root / value for key, value in meta['paths']['multilabel'][split].items()}
        dataset = MultiLabelImageList(**paths, classes=meta['classes'])
        seg_dir = root / meta['paths']['segmentation'][split]['ann_dir']
        assert len(dataset) == meta[f'num_{split}']
        for index in range(len(dataset)):
            path = dataset.samples[index][0]
            labels = cv2.imread(str(seg_dir / f'{path.stem}.png'), cv2.IMREAD_UNCHANGED)
            present = sorted(set(np.unique(labels).tolist()) - {0, 255})
            image, target = dataset[index]
            assert torch.nonzero(target).flatten().tolist() == [label - 1 for label in present]
            assert image.shape == (3, meta['image_size'], meta['image_size'])


def test_generator_writes_normals_and_lists_deterministically(tmp_path):
    options = dict(num_train=3, num_val=2, image_size=32, num_classes=3, shared_images=True)

    def new_files(name: str, seed: int) -> dict[str, bytes]:
        generate_synthetic(tmp_path / name, seed=seed, **options)
        return {str(path.relative_to(tmp_path / name)): path.read_bytes()
                for folder in ('normals', 'multilabel') for path in sorted((tmp_path / name / folder).rglob('*'))
                if path.is_file()}

    first, second, other = new_files('a', 4), new_files('b', 4), new_files('c', 5)
    assert len(first) == 3 + 2 + 2 and first == second
    assert all(first[name] != other[name] for name in first if name.startswith('normals'))


def _copy(tiny_shared, tmp_path: Path) -> tuple[Path, dict]:
    root, meta = tiny_shared
    shutil.copytree(root, tmp_path / 'data')
    return tmp_path / 'data', meta


def _shared_dataset(root: Path, meta: dict, **kwargs) -> DenseMultiTaskDataset:
    paths = meta['paths']
    return DenseMultiTaskDataset(root / paths['normals']['train']['img_dir'],
                                 depth_dir=root / paths['depth']['train']['depth_dir'],
                                 normal_dir=root / paths['normals']['train']['normal_dir'], **kwargs)


def test_bad_normal_maps_raise_data_errors_naming_file_and_index(tiny_shared, tmp_path):
    root, meta = _copy(tiny_shared, tmp_path)
    normal_dir = root / meta['paths']['normals']['train']['normal_dir']
    cv2.imwrite(str(normal_dir / '000002.png'), np.zeros((64, 64), dtype=np.uint8))  # one channel
    cv2.imwrite(str(normal_dir / '000003.png'), np.zeros((32, 32, 3), dtype=np.uint8))  # wrong size
    (normal_dir / '000004.png').write_bytes(b'not a png')
    dataset = _shared_dataset(root, meta)
    dataset[1]
    for index, problem in ((2, '3-channel uint8'), (3, 'but its image is 64x64'), (4, 'corrupt')):
        with pytest.raises(DataError, match=problem) as error:
            dataset[index]
        assert error.value.index == index and error.value.path == str(normal_dir / f'{index:06d}.png')

    (normal_dir / '000005.png').unlink()
    with pytest.raises(DataError, match='has no normal map') as error:
        _shared_dataset(root, meta)
    assert error.value.index == 5
    collected = _shared_dataset(root, meta, errors='collect')
    assert len(collected) == 5 and [problem.index for problem in collected.problems] == [5]


def test_bad_multilabel_lines_raise_data_errors_naming_file_and_line(tiny_shared, tmp_path):
    root, meta = tiny_shared
    ann_file = tmp_path / 'list.txt'
    ann_file.write_text('000000.jpg 1 2\n\n000001.jpg 9\n000002.jpg 1 1\nmissing.jpg\n000003.jpg star\n')
    data_root = root / meta['paths']['multilabel']['train']['data_root']
    for errors in ('raise', 'collect'):
        if errors == 'raise':
            with pytest.raises(DataError, match='line 3: label .9. is not a class index') as error:
                MultiLabelImageList(data_root, ann_file, classes=meta['classes'])
            assert error.value.index == 1 and error.value.path == str(ann_file)
            continue
        dataset = MultiLabelImageList(data_root, ann_file, classes=meta['classes'], errors='collect')
        assert [problem.index for problem in dataset.problems] == [1, 2, 3]
        assert len(dataset) == 2 and torch.equal(dataset.target(1), torch.tensor([0., 0., 0., 1., 0., 0.]))


def test_coco_multilabel_targets_are_the_categories_of_each_images_instances(tmp_path):
    import json

    from mtvision.data.datasets import CocoMultiLabelDataset

    images = tmp_path / 'images'
    images.mkdir()
    for name in ('a.png', 'b.png', 'c.png'):
        cv2.imwrite(str(images / name), np.zeros((8, 8, 3), np.uint8))
    box = [1, 1, 3, 3]
    annotations = [dict(id=1, image_id=10, category_id=7, bbox=box, area=9, iscrowd=0),
                   dict(id=2, image_id=10, category_id=7, bbox=box, area=9, iscrowd=0),
                   dict(id=3, image_id=10, category_id=3, bbox=box, area=9, iscrowd=1),  # a crowd region counts too
                   dict(id=4, image_id=11, category_id=5, bbox=box, area=9, iscrowd=0)]
    ann_file = tmp_path / 'instances.json'
    ann_file.write_text(json.dumps(dict(
        images=[dict(id=i, file_name=name, height=8, width=8) for i, name in ((10, 'a.png'), (11, 'b.png'),
                                                                             (12, 'c.png'))],
        categories=[dict(id=cat, name=f'cat{cat}') for cat in (7, 3, 5)], annotations=annotations)))
    dataset = CocoMultiLabelDataset(images, ann_file)
    # reference: category ids sorted ascending are the labels (3 -> 0, 5 -> 1, 7 -> 2), read off the list above
    assert dataset.classes == ['cat3', 'cat5', 'cat7']
    assert [dataset[i][1].tolist() for i in range(3)] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert dataset[0][0].shape == (3, 8, 8)
