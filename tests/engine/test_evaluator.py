"""The evaluator's inference modes (mmseg's whole and slide), its test_cfg checks, and the dataset index of each
validation row under sharding."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from mtvision.engine import evaluator
from mtvision.engine.evaluator import (InferenceCfg, evaluate, inference_cfg, slide_inference, slide_windows,
                                       val_loader)
from mtvision.tasks import Task


def crop_model(crops: torch.Tensor) -> torch.Tensor:
    """Channel 0: a function of each pixel alone (the same whatever the window); channel 1: the pixel's position
    inside its crop (row + 10 x column), which differs between the windows covering a pixel."""
    rows = torch.arange(crops.shape[-2], dtype=torch.float32)[:, None]
    columns = torch.arange(crops.shape[-1], dtype=torch.float32)[None, :]
    position = (rows + 10 * columns).expand(crops.shape[0], 1, *crops.shape[-2:])
    return torch.cat([crops.square().sum(dim=1, keepdim=True), position], dim=1)


def test_slide_windows_follow_mmseg_and_shift_the_last_to_the_border():
    # 11 rows, crops of 4 every 3: (11 - 4 + 2) // 3 + 1 = 4 windows, the last one shifted back from 9..13
    assert slide_windows(11, 4, 3) == [(0, 4), (3, 7), (6, 10), (7, 11)]
    assert slide_windows(8, 5, 3) == [(0, 5), (3, 8)]
    assert slide_windows(512, 512, 341) == [(0, 512)]
    assert slide_windows(683, 512, 341) == [(0, 512), (171, 683)]  # an ADE20K image resized to short side 512
    assert slide_windows(3, 4, 3) == [(0, 3)]  # smaller than a crop: the whole axis


def mean_position_by_hand() -> np.ndarray:
    """Channel 1 of :func:`crop_model` slid over an 11x8 image with 4x5 crops every 3 pixels: the windows written
    out by hand (rows 0, 3, 6 and 7, the last shifted to the border; columns 0 and 3), summed and counted."""
    summed, count = np.zeros((11, 8)), np.zeros((11, 8))
    for top in (0, 3, 6, 7):
        for left in (0, 3):
            rows, columns = np.mgrid[top:top + 4, left:left + 5]
            summed[rows, columns] += (rows - top) + 10 * (columns - left)
            count[rows, columns] += 1
    assert count.min() == 1 and count.max() == 4
    return summed / count


def test_slide_inference_against_windows_by_hand():
    images = torch.randn(2, 3, 11, 8, generator=torch.Generator().manual_seed(0))
    slid = slide_inference(crop_model, images, crop_size=(4, 5), stride=(3, 3)).numpy()
    # where every window agrees, slide equals whole
    np.testing.assert_allclose(slid[:, 0], crop_model(images)[:, 0].numpy(), rtol=1e-6)
    # elsewhere: the mean over the windows covering each pixel
    np.testing.assert_allclose(slid[:, 1], np.stack([mean_position_by_hand()] * 2), rtol=1e-6)
    assert slid[0, 1, 3, 0] == pytest.approx((3 + 0) / 2)  # row 3: windows 0..4 and 3..7


def test_slide_inference_refuses_outputs_of_another_size():
    with pytest.raises(ValueError, match='outputs at the size of their crop'):
        slide_inference(lambda crops: crops[..., ::2, ::2], torch.zeros(1, 3, 8, 8), (4, 4), (4, 4))


def task_with(test_cfg, task_type='segmentation', val_dataset=None) -> Task:
    task = Task(name='seg', type=task_type, head={}, train_dataset=None, val_dataset=val_dataset, batch_size=2,
                val_batch_size=2)
    task.test_cfg = test_cfg  # what build_tasks sets from tasks.<name>.test_cfg
    return task


def test_test_cfg_defaults_and_slide():
    assert inference_cfg(task_with(None)) == InferenceCfg(mode='whole', original_size=True)
    assert inference_cfg(task_with(dict(original_size=False))) == InferenceCfg(original_size=False)
    assert inference_cfg(task_with(dict(mode='slide', crop_size=512, stride=(341, 341)))) == InferenceCfg(
        mode='slide', crop_size=(512, 512), stride=(341, 341))


@pytest.mark.parametrize('test_cfg, task_type, message', [
    (dict(mode='sliding'), 'segmentation', r"tasks.seg.test_cfg.mode must be one of \('whole', 'slide'\)"),
    (dict(mode='slide', crop_size=(512, 512)), 'segmentation', "tasks.seg.test_cfg.mode='slide' needs stride"),
    (dict(mode='slide', crop_size=(512, 0), stride=341), 'depth', r'tasks.seg.test_cfg.crop_size must be a posi'),
    (dict(mode='slide', crop_size=512, stride=341), 'classification', "is for the dense task types"),
    (dict(crop_size=512), 'segmentation', "crop_size and stride are for mode='slide'"),
    (dict(flip=True), 'segmentation', "unknown key tasks.seg.test_cfg.'flip'"),
    (dict(original_size=1), 'depth', 'original_size must be True or False'),
])
def test_bad_test_cfg_names_the_key(test_cfg, task_type, message):
    with pytest.raises(ValueError, match=message):
        inference_cfg(task_with(test_cfg, task_type))


class NumberedMaps(Dataset):
    """Sample ``i``: a 4x4 image and target filled with ``i``; its original target is ``i`` at ``i + 1`` rows."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, index):
        return torch.full((3, 4, 4), float(index)), torch.full((4, 4), index)

    def original_target(self, index):
        return torch.full((index + 1, 3), index)


@pytest.mark.parametrize('rank, expected', [(0, [0, 2, 4]), (1, [1, 3])])
def test_each_row_carries_its_dataset_index_and_original_target_in_a_shard(monkeypatch, rank, expected):
    monkeypatch.setattr(evaluator, 'rank_and_world', lambda: (rank, 2))
    batches = list(val_loader(task_with(None, val_dataset=NumberedMaps()), original_targets=True))
    assert [index for batch in batches for index in batch['indices']] == expected
    for batch in batches:
        assert batch['images'][:, 0, 0, 0].tolist() == batch['indices']  # the rows are those samples
        assert [tuple(t.shape) for t in batch['original_targets']] == [(i + 1, 3) for i in batch['indices']]
        assert [int(t.unique()) for t in batch['original_targets']] == batch['indices']
    unsharded = list(val_loader(task_with(None, val_dataset=NumberedMaps()), shard=False))
    assert [batch['indices'] for batch in unsharded] == [[0, 1], [2, 3], [4]]
    assert 'original_targets' not in unsharded[0]


class CropModel(torch.nn.Module):
    """A model with one segmentation "head" whose logits are :func:`crop_model` of its input."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # the evaluator finds the device from the parameters
        self.heads = {'seg': SimpleNamespace(predict=lambda logits: logits.argmax(dim=1))}

    def forward(self, task, images):
        return crop_model(images) * self.scale


class RandomImages(Dataset):
    """11x8 inputs; every pixel's ground truth is class 1 (an 11x8 original target)."""

    def __init__(self):
        self.images = torch.rand(3, 3, 11, 8, generator=torch.Generator().manual_seed(1)) * 0.3

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], torch.ones(11, 8, dtype=torch.int64)

    def original_target(self, index):
        return torch.ones(11, 8, dtype=torch.int64)


@pytest.mark.parametrize('test_cfg', [None, dict(mode='slide', crop_size=(4, 5), stride=3)])
def test_evaluate_runs_the_task_test_cfg(test_cfg):
    task = task_with(test_cfg, val_dataset=RandomImages())
    task.metric = dict(type='SegmentationMetric', num_classes=2)
    # class 1 wins where the pixel's (mean) position in its crop beats its squared intensities
    squares = (RandomImages().images ** 2).sum(dim=1).numpy()
    rows, columns = np.mgrid[0:11, 0:8]
    position = mean_position_by_hand() if test_cfg else rows + 10 * columns
    expected = 100 * np.mean(position > squares)
    assert 0 < expected < 100
    assert evaluate(CropModel(), {'seg': task})['seg']['aAcc'] == pytest.approx(expected)


def test_shards_merge_to_the_single_process_metrics(monkeypatch):
    """Two ranks' shards, each scored at the original size, merge to the metrics of one process on every image."""
    task = task_with(dict(mode='slide', crop_size=(4, 5), stride=3), val_dataset=RandomImages())
    task.metric = dict(type='SegmentationMetric', num_classes=2)
    single = evaluate(CropModel(), {'seg': task})['seg']
    states = []
    monkeypatch.setattr(evaluator, 'all_gather_objects', lambda state: states.append(state) or [state])
    for rank in range(2):
        monkeypatch.setattr(evaluator, 'rank_and_world', lambda: (rank, 2))
        evaluate(CropModel(), {'seg': task})
    merged = evaluator.build_metric(task)
    merged.merge(states)
    assert [int(state['confusion'].sum()) for state in states] == [2 * 88, 88]  # images 0, 2 and image 1
    assert merged.compute() == single


def test_the_metrics_table_gives_each_metric_its_unit_and_the_untrained_value():
    from mtvision.engine.evaluator import metrics_table

    table = metrics_table({'cls': {'top1': 46.0}, 'depth': {'abs_rel': 0.184, 'rmse': 0.52, 'rmse_log': 0.2},
                           'seg': {'mIoU': 39.4}}, baseline={'cls': {'top1': 10.0}, 'seg': {}})
    rows = [line.split() for line in table.splitlines()]
    assert rows[0] == ['task', 'metric', 'unit', 'untrained', 'value']
    assert rows[2] == ['cls', 'top1', '%', '10', '46']
    assert rows[3] == ['depth', 'abs_rel', '0.184']  # a ratio: no unit, no untrained value
    assert rows[4] == ['depth', 'rmse', 'm', '0.52'] and rows[5] == ['depth', 'rmse_log', '0.2']
    assert rows[6] == ['seg', 'mIoU', '%', '39.4']
