"""Loader behaviour on hand-made files, and a DataError naming the file and index for each kind of bad input."""
import json
import pickle
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mtvision.data import CocoDetectionDataset, DataError, DepthDataset, ImageFolderDataset, SegmentationDataset


def write_image(path: Path, height: int = 8, width: int = 8, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), value, dtype=np.uint8))
    return path


def write_map(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def raises_data_error(path, index):
    """The DataError must name the file and, when given, the index."""
    return pytest.raises(DataError, match=re.escape(repr(str(path))) + ('' if index is None else f', index {index}:'))


# ImageFolder ----------------------------------------------------------------------------------------------------

def test_image_folder_reads_rgb_and_labels(tmp_path):
    path = tmp_path / 'b_class' / 'x.PNG'  # upper-case extension, like ImageNet's .JPEG
    path.parent.mkdir()
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[..., 2] = 200  # red in BGR
    cv2.imwrite(str(path), pixels)
    write_image(tmp_path / 'a_class' / 'nested' / 'y.jpg')
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ['a_class', 'b_class'] and dataset.num_classes == 2
    image, label = dataset[1]
    assert label == 1 and image.shape == (3, 4, 6)
    assert image[0].eq(200).all() and image[1:].eq(0).all(), 'channels must come out RGB'


def test_image_folder_bad_inputs(tmp_path):
    write_image(tmp_path / 'cat' / 'ok.jpg')
    (tmp_path / 'dog').mkdir()
    with raises_data_error(tmp_path / 'dog', 1):
        ImageFolderDataset(tmp_path)  # empty class folder
    with raises_data_error(tmp_path / 'cow', 1):
        ImageFolderDataset(tmp_path, classes=['cat', 'cow'])  # missing class folder
    with raises_data_error(tmp_path / 'cat', None):
        ImageFolderDataset(tmp_path / 'cat')  # no class folders at all

    corrupt = tmp_path / 'dog' / 'corrupt.jpg'
    corrupt.write_bytes(b'not a jpeg')
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.samples[1] == (corrupt, 1)
    with raises_data_error(corrupt, 1):
        dataset[1]


def test_image_folder_annotation_list(tmp_path):
    write_image(tmp_path / 'images' / 'a b.jpg', value=10)
    write_image(tmp_path / 'images' / 'c.jpg', value=20)
    ann_file = tmp_path / 'train.txt'
    ann_file.write_text('images/a b.jpg 2\n\nimages/c.jpg 0\n')
    dataset = ImageFolderDataset(tmp_path, ann_file=ann_file)
    assert [label for _, label in dataset.samples] == [2, 0] and dataset.classes == ['0', '1', '2']
    assert dataset[0][0].float().mean().item() == pytest.approx(10, abs=1)

    with raises_data_error(ann_file, 0):
        ImageFolderDataset(tmp_path, ann_file=ann_file, classes=['x', 'y'])  # class index 2 >= num_classes
    ann_file.write_text('images/c.jpg 0\nimages/missing.jpg 1\n')
    with raises_data_error(ann_file, 1):
        ImageFolderDataset(tmp_path, ann_file=ann_file)
    ann_file.write_text('images/c.jpg zero\n')
    with raises_data_error(ann_file, 0):
        ImageFolderDataset(tmp_path, ann_file=ann_file)


def test_data_error_survives_pickling(tmp_path):
    error = DataError('corrupt', tmp_path / 'x.jpg', 3)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and (copy.path, copy.index) == (str(tmp_path / 'x.jpg'), 3)


# COCO -----------------------------------------------------------------------------------------------------------

def write_coco(tmp_path: Path, annotations: list[dict], images: list[dict] | None = None) -> Path:
    images = images if images is not None else [dict(id=7, file_name='a.jpg', height=10, width=12),
                                                dict(id=3, file_name='b.jpg', height=10, width=12)]
    for image in images:
        if not (tmp_path / 'img' / image['file_name']).exists():
            write_image(tmp_path / 'img' / image['file_name'], image['height'], image['width'])
    categories = [dict(id=5, name='five'), dict(id=2, name='two')]
    ann_file = tmp_path / 'instances.json'
    ann_file.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return ann_file


def annotation(ann_id, image_id, category_id, bbox, **extra):
    x, y, w, h = bbox
    polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
    return dict(dict(id=ann_id, image_id=image_id, category_id=category_id, bbox=bbox, area=w * h, iscrowd=0,
                     segmentation=[polygon]), **extra)


def test_coco_targets(tmp_path):
    ann_file = write_coco(tmp_path, [annotation(1, 7, 5, [2, 1, 4, 3]), annotation(2, 7, 2, [8, 6, 6, 6]),
                                     annotation(3, 7, 2, [0, 0, 5, 5], iscrowd=1)])
    dataset = CocoDetectionDataset(tmp_path / 'img', ann_file)
    assert dataset.cat_ids == [2, 5] and dataset.classes == ['two', 'five'] and dataset.img_ids == [3, 7]
    image, target = dataset[0]
    assert target['image_id'] == 3 and target['boxes'].shape == (0, 4) and target['masks'].shape == (0, 10, 12)
    image, target = dataset[1]
    assert image.shape == (3, 10, 12) and target['orig_size'] == (10, 12)
    assert target['labels'].tolist() == [1, 0], 'contiguous labels follow sorted category ids; crowd left out'
    # the second box runs past the right and bottom edges: clipped to the image
    assert target['boxes'].tolist() == [[2, 1, 6, 4], [8, 6, 12, 10]]
    reference = np.zeros((10, 12), dtype=np.uint8)
    reference[1:4, 2:6] = 1  # COCO polygons cover the pixels whose centres lie inside
    assert np.array_equal(target['masks'][0].numpy(), reference)
    assert target['masks'].dtype == torch.uint8 and target['masks'][1].sum() == 4 * 4
    no_masks = CocoDetectionDataset(tmp_path / 'img', ann_file, with_masks=False)
    assert 'masks' not in no_masks[1][1]


def test_coco_box_entirely_outside_its_image_is_dropped_as_the_audit_says(tmp_path):
    ann_file = write_coco(tmp_path, [annotation(1, 7, 5, [2, 1, 4, 3]), annotation(2, 7, 2, [12, 2, 3, 3]),
                                     annotation(3, 7, 2, [9, 7, 6, 6])])
    dataset = CocoDetectionDataset(tmp_path / 'img', ann_file, errors='collect')
    assert [problem.problem.split(': ', 1)[1] for problem in dataset.problems] == [
        'box [12, 2, 3, 3] lies entirely outside its 10x12 image: dropped in training',
        'box [9, 7, 6, 6] reaches more than a pixel outside its 10x12 image: clipped to it in training']
    _, target = dataset[1]
    assert target['boxes'].tolist() == [[2, 1, 6, 4], [9, 7, 12, 10]] and target['labels'].tolist() == [1, 0]
    assert target['masks'].shape == (2, 10, 12)


@pytest.mark.parametrize('bad, index', [
    (dict(bbox=[1, 1, 0, 3]), 1),  # zero width
    (dict(bbox=[1, 1, 3, -2]), 1),  # negative height
    (dict(category_id=9), 1),  # not a category
    (dict(image_id=99), 1),  # not an image
])
def test_coco_bad_annotations(tmp_path, bad, index):
    ann_file = write_coco(tmp_path, [annotation(1, 7, 5, [1, 1, 2, 2]), {**annotation(2, 3, 2, [1, 1, 3, 3]), **bad}])
    with raises_data_error(ann_file, index):
        CocoDetectionDataset(tmp_path / 'img', ann_file)


def test_coco_bad_files(tmp_path):
    images = [dict(id=1, file_name='a.jpg', height=10, width=12), dict(id=2, file_name='gone.jpg', height=10,
                                                                            width=12)]
    ann_file = write_coco(tmp_path, [], images)
    (tmp_path / 'img' / 'gone.jpg').unlink()
    with raises_data_error(ann_file, 1):
        CocoDetectionDataset(tmp_path / 'img', ann_file)  # annotation names a missing file

    write_image(tmp_path / 'img' / 'gone.jpg', 9, 12)  # size differs from the annotation
    dataset = CocoDetectionDataset(tmp_path / 'img', ann_file)
    with raises_data_error(tmp_path / 'img' / 'gone.jpg', 1):
        dataset[1]
    (tmp_path / 'img' / 'gone.jpg').write_bytes(b'\xff\xd8 truncated')
    with raises_data_error(tmp_path / 'img' / 'gone.jpg', 1):
        dataset[1]
    ann_file.write_text('{"images": [')
    with raises_data_error(ann_file, None):
        CocoDetectionDataset(tmp_path / 'img', ann_file)


# segmentation and depth -----------------------------------------------------------------------------------------

def test_segmentation_labels_and_reduce_zero_label(tmp_path):
    stored = np.array([[0, 1, 2], [3, 255, 1]], dtype=np.uint8)
    write_image(tmp_path / 'img' / 'sub' / 'x.jpg', 2, 3)
    write_map(tmp_path / 'ann' / 'sub' / 'x.png', stored)
    plain = SegmentationDataset(tmp_path / 'img', tmp_path / 'ann', num_classes=4)
    assert np.array_equal(plain[0][1].numpy(), stored)
    reduced = SegmentationDataset(tmp_path / 'img', tmp_path / 'ann', num_classes=3, reduce_zero_label=True)
    expected = np.vectorize({0: 255, 1: 0, 2: 1, 3: 2, 255: 255}.get)(stored)
    assert np.array_equal(reduced[0][1].numpy(), expected)


def test_segmentation_bad_inputs(tmp_path):
    write_image(tmp_path / 'img' / 'a.jpg', 4, 4)
    write_image(tmp_path / 'img' / 'b.jpg', 4, 4)
    write_map(tmp_path / 'ann' / 'a.png', np.full((4, 4), 3, dtype=np.uint8))
    with raises_data_error(tmp_path / 'ann', 1):
        SegmentationDataset(tmp_path / 'img', tmp_path / 'ann', num_classes=4)  # b.jpg has no label map
    write_map(tmp_path / 'ann' / 'b.png', np.full((4, 5), 1, dtype=np.uint8))
    dataset = SegmentationDataset(tmp_path / 'img', tmp_path / 'ann', num_classes=3)
    with raises_data_error(tmp_path / 'ann' / 'a.png', 0):
        dataset[0]  # label 3 >= num_classes and not ignore
    with raises_data_error(tmp_path / 'ann' / 'b.png', 1):
        dataset[1]  # 4x5 map for a 4x4 image
    with raises_data_error(tmp_path / 'none', None):
        (tmp_path / 'none').mkdir()
        SegmentationDataset(tmp_path / 'none', tmp_path / 'ann', num_classes=3)  # no images


def test_depth_values_and_bad_inputs(tmp_path):
    millimetres = np.array([[0, 1500], [65535, 2]], dtype=np.uint16)
    write_image(tmp_path / 'rgb' / 'a.jpg', 2, 2)
    write_map(tmp_path / 'depth' / 'a.png', millimetres)
    write_image(tmp_path / 'rgb' / 'b.jpg', 2, 2)
    write_map(tmp_path / 'depth' / 'b.png', np.ones((3, 2), dtype=np.uint16))
    dataset = DepthDataset(tmp_path / 'rgb', tmp_path / 'depth')
    _, depth = dataset[0]
    assert depth.dtype == torch.float32 and depth.shape == (1, 2, 2)
    torch.testing.assert_close(depth[0], torch.tensor([[0.0, 1.5], [65.535, 0.002]]))
    kitti = DepthDataset(tmp_path / 'rgb', tmp_path / 'depth', depth_scale=256.0)
    assert kitti[0][1][0, 0, 1].item() == pytest.approx(1500 / 256)
    with raises_data_error(tmp_path / 'depth' / 'b.png', 1):
        dataset[1]  # depth map size differs from its image
    (tmp_path / 'depth' / 'b.png').unlink()
    with raises_data_error(tmp_path / 'depth', 1):
        DepthDataset(tmp_path / 'rgb', tmp_path / 'depth')


def test_depth_sync_layout_pairs_by_prefix_in_one_folder(tmp_path):
    """BTS's NYUv2 "sync" download: <scene>/rgb_00000.jpg beside <scene>/sync_depth_00000.png, millimetres."""
    scene = tmp_path / 'sync' / 'bathroom_0001'
    millimetres = np.array([[0, 1500], [9999, 2]], dtype=np.uint16)
    write_image(scene / 'rgb_00000.jpg', 2, 2)
    write_map(scene / 'sync_depth_00000.png', millimetres)
    write_image(scene / 'rgb_00007.jpg', 2, 2)
    write_map(scene / 'sync_depth_00007.png', np.ones((2, 2), dtype=np.uint16))
    write_image(scene / 'thumbnail.jpg', 2, 2)  # not an image of the layout: no rgb_ prefix
    sync = dict(img_prefix='rgb_', depth_prefix='sync_depth_')
    dataset = DepthDataset(tmp_path / 'sync', tmp_path / 'sync', **sync)
    assert [pair[1].name for pair in dataset.samples] == ['sync_depth_00000.png', 'sync_depth_00007.png']
    torch.testing.assert_close(dataset[0][1][0], torch.from_numpy(millimetres / 1000.0).float())
    torch.testing.assert_close(dataset.original_target(0), dataset[0][1])

    (scene / 'sync_depth_00007.png').unlink()
    with pytest.raises(DataError, match=re.escape(f"{str(tmp_path / 'sync')!r}, index 1: image "
                                                  f"{str(scene / 'rgb_00007.jpg')!r} has no depth map "
                                                  f"{str(scene / 'sync_depth_00007.png')!r}")):
        DepthDataset(tmp_path / 'sync', tmp_path / 'sync', **sync)
    collecting = DepthDataset(tmp_path / 'sync', tmp_path / 'sync', errors='collect', **sync)
    assert len(collecting) == 1 and collecting.problems[0].index == 1
    with pytest.raises(ValueError, match="img_prefix='' must tell them apart"):
        DepthDataset(tmp_path / 'sync', tmp_path / 'sync', img_suffix='.png', depth_prefix='sync_depth_')
    with raises_data_error(tmp_path / 'sync', None):
        DepthDataset(tmp_path / 'sync', tmp_path / 'sync', img_prefix='color_', depth_prefix='sync_depth_')


def test_depth_original_target_is_the_stored_map_whatever_the_pipeline(tmp_path):
    write_image(tmp_path / 'rgb' / 'a.jpg', 4, 6)
    write_map(tmp_path / 'depth' / 'a.png', np.arange(24, dtype=np.uint16).reshape(4, 6) * 100)
    dataset = DepthDataset(tmp_path / 'rgb', tmp_path / 'depth',
                           pipeline=[dict(type='Resize', size=(8, 8), antialias=True)])
    assert dataset[0][1].shape == (1, 8, 8)
    original = dataset.original_target(0)
    assert original.dtype == torch.float32 and original.shape == (1, 4, 6)
    torch.testing.assert_close(original[0], torch.arange(24.0).reshape(4, 6) / 10)
