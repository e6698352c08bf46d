"""Synthetic files read back through the format loaders agree with the scenes rendered in memory."""
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors

from mtvision.data.synthetic import synthetic_scene
from mtvision.registry import DATASETS

TYPES = dict(classification='ImageFolderDataset', detection='CocoDetectionDataset',
             segmentation='SegmentationDataset', depth='DepthDataset')


def build(root: Path, meta: dict, task: str, split: str, **kwargs):
    paths = {key: str(root / value) for key, value in meta['paths'][task][split].items()}
    return DATASETS.build(dict(type=TYPES[task], **paths, **kwargs))


def scene(meta: dict, stream: str, split: str, index: int):
    return synthetic_scene(meta['seed'], stream, split, index, meta['image_size'], meta['num_classes'])


def assert_jpeg_close(image: torch.Tensor, expected: np.ndarray) -> None:
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    difference = np.abs(image.permute(1, 2, 0).numpy().astype(int) - expected.astype(int))
    assert difference.mean() < 4, 'JPEG at quality 95 stays close; another scene is ~50 away'


def check_detection(dataset, meta: dict, stream: str, split: str) -> None:
    assert dataset.cat_ids == list(range(1, meta['num_classes'] + 1))
    for index in range(len(dataset)):
        image, target = dataset[index]
        expected = scene(meta, stream, split, index)
        assert_jpeg_close(image, expected.image)
        assert target['image_id'] == index + 1 and target['orig_size'] == (64, 64)
        assert isinstance(target['boxes'], tv_tensors.BoundingBoxes) and target['boxes'].canvas_size == (64, 64)
        torch.testing.assert_close(target['boxes'], torch.tensor([i.box for i in expected.instances]).float(),
                                   atol=1, rtol=0)
        assert target['labels'].tolist() == [i.label for i in expected.instances]
        assert target['masks'].dtype == torch.uint8
        assert np.array_equal(target['masks'].numpy().astype(bool), np.stack([i.mask for i in expected.instances]))


def check_dense(segmentation, depth, meta: dict, stream: str, split: str) -> None:
    for index in range(len(segmentation)):
        expected = scene(meta, stream if stream == 'shared' else 'segmentation', split, index)
        image, labels = segmentation[index]
        assert_jpeg_close(image, expected.image)
        assert isinstance(labels, tv_tensors.Mask) and labels.dtype == torch.int64
        assert np.array_equal(labels.numpy(), expected.semantic)
    for index in range(len(depth)):
        expected = scene(meta, stream if stream == 'shared' else 'depth', split, index)
        image, metres = depth[index]
        assert_jpeg_close(image, expected.image)
        assert isinstance(metres, tv_tensors.Mask) and metres.dtype == torch.float32 and metres.shape == (1, 64, 64)
        assert np.abs(metres[0].numpy() - expected.depth).max() <= 0.0005 + 1e-6
        assert np.array_equal(metres[0].numpy() == 0, expected.depth == 0)


def test_default_layout_round_trips(tiny_default):
    root, meta = tiny_default
    classes = meta['classes']
    for split in ('train', 'val'):
        classification = build(root, meta, 'classification', split, classes=classes)
        assert classification.classes == classes and len(classification) == 6
        for index, (path, label) in enumerate(classification.samples):
            stem_index = int(path.stem)
            expected = scene(meta, 'classification', split, stem_index)
            assert path.parent.name == classes[label] and label == expected.label
            image, loaded_label = classification[index]
            assert loaded_label == label
            assert_jpeg_close(image, expected.image)
        # without explicit classes the folders sort by name, the same way for both splits
        sorted_folders = build(root, meta, 'classification', split)
        assert sorted_folders.classes == sorted(classes)
        assert [sorted_folders.classes[label] for _, label in sorted_folders.samples] == \
            [path.parent.name for path, _ in sorted_folders.samples]

        detection = build(root, meta, 'detection', split)
        assert detection.classes == classes and len(detection) == 6
        check_detection(detection, meta, 'detection', split)
        segmentation = build(root, meta, 'segmentation', split, num_classes=len(meta['segmentation_classes']),
                             classes=meta['segmentation_classes'])
        depth = build(root, meta, 'depth', split, depth_scale=meta['depth_scale'])
        check_dense(segmentation, depth, meta, 'default', split)


def test_shared_layout_is_one_image_set_read_by_all_four_loaders(tiny_shared):
    root, meta = tiny_shared
    assert not (root / 'detection' / 'images').exists() and not (root / 'depth' / 'val' / 'rgb').exists()
    for split in ('train', 'val'):
        classification = build(root, meta, 'classification', split, classes=meta['classes'])
        detection = build(root, meta, 'detection', split)
        segmentation = build(root, meta, 'segmentation', split, num_classes=len(meta['segmentation_classes']))
        depth = build(root, meta, 'depth', split)
        image_files = [path for path, _ in classification.samples]
        assert image_files == sorted((root / 'images' / split).iterdir())
        assert [path for path, _ in segmentation.samples] == image_files
        assert [path for path, _ in depth.samples] == image_files
        assert [detection.img_dir / detection.coco.imgs[i]['file_name'] for i in detection.img_ids] == image_files
        for index, (_, label) in enumerate(classification.samples):
            expected = scene(meta, 'shared', split, index)
            areas = [int(instance.mask.sum()) for instance in expected.instances]
            assert label == expected.instances[int(np.argmax(areas))].label
        check_detection(detection, meta, 'shared', split)
        check_dense(segmentation, depth, meta, 'shared', split)
