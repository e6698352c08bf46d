import pickle
import shutil

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from mtvision.data.collate import COLLATE_FNS, collate_fn_for
from mtvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtvision.registry import DATASETS
from mtvision.tasks import Task

TYPES = dict(classification='ImageFolderDataset', detection='CocoDetectionDataset',
             segmentation='SegmentationDataset', depth='DepthDataset')
TRAIN = [dict(type='RandomResizedCrop', size=32, scale=(0.5, 1.0)), dict(type='RandomHorizontalFlip'),
         dict(type='ToFloat'), dict(type='Normalize', mean=IMAGENET_MEAN, std=IMAGENET_STD)]


def samples(root, meta, task, **kwargs):
    pipeline = TRAIN[:2] + [dict(type='SanitizeBoundingBoxes')] + TRAIN[2:] if task == 'detection' else TRAIN
    paths = {key: str(root / value) for key, value in meta['paths'][task]['train'].items()}
    dataset = DATASETS.build(dict(type=TYPES[task], pipeline=pipeline, **paths, **kwargs))
    return [dataset[index] for index in range(4)]


def assert_plain(tensor: torch.Tensor) -> None:
    assert type(tensor) is torch.Tensor, 'batches hold plain tensors, not tv_tensors'


def test_batches_of_each_task_type(tiny_default):
    root, meta = tiny_default
    torch.manual_seed(0)
    batch = COLLATE_FNS['classification'](items := samples(root, meta, 'classification'))
    assert_plain(batch['images'])
    assert batch['images'].shape == (4, 3, 32, 32) and batch['images'].dtype == torch.float32
    assert batch['targets'].dtype == torch.int64 and batch['targets'].tolist() == [label for _, label in items]
    assert torch.equal(batch['images'][2], items[2][0])

    items = samples(root, meta, 'detection')
    batch = COLLATE_FNS['detection'](items)
    assert batch['images'].shape == (4, 3, 32, 32) and len(batch['targets']) == 4
    for target, (_, original) in zip(batch['targets'], items):
        assert target['input_size'] == (32, 32) and target['orig_size'] == (64, 64)
        for key in ('boxes', 'labels', 'masks'):
            assert_plain(target[key])
            assert torch.equal(target[key], original[key])
        assert target['boxes'].dtype == torch.float32 and target['labels'].dtype == torch.int64
        assert target['masks'].dtype == torch.uint8 and target['masks'].shape == (len(target['boxes']), 32, 32)
        assert target['image_id'] == original['image_id']

    items = samples(root, meta, 'segmentation', num_classes=len(meta['segmentation_classes']))
    batch = COLLATE_FNS['segmentation'](items)
    assert_plain(batch['targets'])
    assert batch['targets'].shape == (4, 32, 32) and batch['targets'].dtype == torch.int64
    assert torch.equal(batch['targets'][1], items[1][1])

    items = samples(root, meta, 'depth')
    batch = COLLATE_FNS['depth'](items)
    assert_plain(batch['targets'])
    assert batch['targets'].shape == (4, 1, 32, 32) and batch['targets'].dtype == torch.float32
    assert torch.equal(batch['targets'][3], items[3][1])


def test_collate_rejects_unusable_batches():
    image = tv_tensors.Image(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match='share a size'):
        COLLATE_FNS['classification']([(image, 0), (tv_tensors.Image(torch.zeros(3, 8, 9)), 1)])
    with pytest.raises(TypeError, match='ToFloat'):  # uint8 is kept for normalisation on the device
        COLLATE_FNS['classification']([(tv_tensors.Image(torch.zeros(3, 8, 8, dtype=torch.int16)), 0)])


def test_a_batch_of_mixed_sizes_names_the_task_its_files_and_a_fixing_transform(tiny_default, tmp_path):
    root, meta = tiny_default
    paths = meta['paths']['depth']['train']
    img_dir, depth_dir = tmp_path / 'rgb', tmp_path / 'depth'
    shutil.copytree(root / paths['img_dir'], img_dir)
    shutil.copytree(root / paths['depth_dir'], depth_dir)
    # a full-size NYUv2 frame among the 64 px scenes, and a pipeline of flips only
    cv2.imwrite(str(img_dir / 'large.jpg'), np.zeros((480, 640, 3), np.uint8))
    cv2.imwrite(str(depth_dir / 'large.png'), np.full((480, 640), 1000, np.uint16))
    dataset = DATASETS.build(dict(type='DepthDataset', img_dir=img_dir, depth_dir=depth_dir,
                                  pipeline=[dict(type='RandomHorizontalFlip')] + TRAIN[2:]))
    task = Task(name='depth', type='depth', head={}, train_dataset=dataset, val_dataset=None, batch_size=7,
                val_batch_size=7)
    loader = DataLoader(dataset, batch_size=len(dataset), collate_fn=collate_fn_for(task))
    with pytest.raises(ValueError) as error:
        next(iter(loader))
    message = str(error.value)
    assert message.startswith('tasks.depth.train_dataset: images of one batch must share a size')
    assert f"480x640 in 1 image ('{img_dir / 'large.jpg'}')" in message
    assert f"64x64 in 6 images ('{img_dir / '000000.jpg'}'" in message and 'and 3 more' in message
    assert 'RandomResizedCrop' in message and '\n' not in message, 'one line, as the fatal-error log shows it'


def test_samples_keep_their_file_through_pickling_and_image_only_wrappers(tiny_default):
    root, meta = tiny_default
    paths = {key: str(root / value) for key, value in meta['paths']['classification']['train'].items()}
    dataset = DATASETS.build(dict(type='ImagesOf', dataset=dict(type='ImageFolderDataset', **paths)))
    image, target = sample = dataset[0]
    assert target is None and sample.path.startswith(paths['data_root']) and sample.path.endswith('.jpg')
    copy = pickle.loads(pickle.dumps(sample))
    assert copy.path == sample.path and torch.equal(copy[0], image)
