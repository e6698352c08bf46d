"""ADE20K as unpacked (ADEChallengeData2016), and dense evaluation against the ground truth at its original size.

A tiny replica with the real folder and file names holds images of different sizes; the val pipeline resizes them
to 64x64 while the metrics must see the stored ground truth, as mmsegmentation scores it (its ``whole`` mode: the
logits resized bilinearly to the original size, then intersection and union accumulated over the whole set).
"""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mtvision.data import SegmentationDataset
from mtvision.engine import Trainer

NUM_CLASSES = 4  # ADE20K has 150; stored ids 1..NUM_CLASSES, 0 = "other"
# (height, width) of each image, as ADE20K's vary; the val pipeline resizes them all to 64x64
SIZES = dict(training=[(80, 96), (60, 72)], validation=[(70, 90), (64, 48), (50, 66)])
PREFIX = dict(training='ADE_train', validation='ADE_val')


def write_ade20k(root: Path, seed: int = 0) -> Path:
    """``root/ADEChallengeData2016`` as the official zip unpacks: ``images/{training,validation}/ADE_*.jpg`` and
    ``annotations/{training,validation}/ADE_*.png`` (uint8 class ids, 0 = other), image and map in blocks of one
    class so that the task can be learnt at all."""
    rng = np.random.default_rng(seed)
    data = root / 'ADEChallengeData2016'
    for split, sizes in SIZES.items():
        for number, (height, width) in enumerate(sizes, start=1):
            blocks = rng.integers(0, NUM_CLASSES + 1, size=(4, 4), dtype=np.uint8)
            labels = cv2.resize(blocks, (width, height), interpolation=cv2.INTER_NEAREST)
            image = (labels[..., None] * 50 + rng.integers(0, 30, size=(height, width, 3))).astype(np.uint8)
            stem = f'{PREFIX[split]}_{number:08d}'
            for folder, name, array in (('images', f'{stem}.jpg', image), ('annotations', f'{stem}.png', labels)):
                (data / folder / split).mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(data / folder / split / name), array)
    return data


def ade20k_task(data: Path, base: dict) -> dict:
    """The config's segmentation task pointed at ADEChallengeData2016 (the README's snippet)."""
    dataset = dict(type='SegmentationDataset', num_classes=NUM_CLASSES, reduce_zero_label=True)
    return dict(base, head=dict(base['head'], num_classes=NUM_CLASSES),
                train_dataset=dict(dataset, img_dir=str(data / 'images/training'),
                                   ann_dir=str(data / 'annotations/training'),
                                   pipeline=base['train_dataset']['pipeline']),
                val_dataset=dict(dataset, img_dir=str(data / 'images/validation'),
                                 ann_dir=str(data / 'annotations/validation'),
                                 pipeline=base['val_dataset']['pipeline']),
                metric=dict(type='SegmentationMetric', num_classes=NUM_CLASSES))


def reduce_zero_label(stored: np.ndarray) -> np.ndarray:
    return np.where(stored == 0, 255, stored.astype(np.int64) - 1)


def resize_bilinear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[C, h, w]`` resized to ``size`` with half-pixel centres (torch's ``align_corners=False``), in float64."""
    def taps(out: int, inp: int):
        source = np.maximum((np.arange(out) + 0.5) * inp / out - 0.5, 0.0)
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, inp - 1), source - low

    (top, bottom, dy), (left, right, dx) = taps(size[0], array.shape[1]), taps(size[1], array.shape[2])
    rows = array[:, top] * (1 - dy)[:, None] + array[:, bottom] * dy[:, None]
    return rows[:, :, left] * (1 - dx) + rows[:, :, right] * dx


def model_outputs(model, task: str, dataset, index: int) -> np.ndarray:
    """The head's raw outputs for sample ``index`` as the val pipeline gives it, ``[C, 64, 64]`` float64."""
    with torch.no_grad():
        return model.eval()(task, dataset[index][0][None])[0].double().numpy()


def miou_reference(predictions: list[np.ndarray], truths: list[np.ndarray]) -> float:
    """mmseg's IoUMetric: areas of intersection and union per class summed over the set (ignore 255 left out),
    IoU nan where the union is empty, mIoU the nanmean, in percent."""
    intersect, union = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    for prediction, truth in zip(predictions, truths):
        valid = truth != 255
        prediction, truth = prediction[valid], truth[valid]
        for label in range(NUM_CLASSES):
            intersect[label] += np.sum((prediction == label) & (truth == label))
            union[label] += np.sum((prediction == label) | (truth == label))
    with np.errstate(invalid='ignore'):
        return 100 * np.nanmean(intersect / union)


def test_ade20k_reads_as_unpacked(tmp_path):
    data = write_ade20k(tmp_path)
    dataset = SegmentationDataset(data / 'images/validation', data / 'annotations/validation',
                                  num_classes=NUM_CLASSES, reduce_zero_label=True,
                                  pipeline=[dict(type='Resize', size=(64, 64))])
    assert [Path(image).name for image, _ in dataset.samples] == [
        'ADE_val_00000001.jpg', 'ADE_val_00000002.jpg', 'ADE_val_00000003.jpg']
    for index, size in enumerate(SIZES['validation']):
        stored = cv2.imread(str(dataset.samples[index][1]), cv2.IMREAD_UNCHANGED)
        assert dataset[index][1].shape == (64, 64)
        original = dataset.original_target(index)
        assert original.dtype == torch.int64 and tuple(original.shape) == size
        np.testing.assert_array_equal(original.numpy(), reduce_zero_label(stored))
    seen = set(np.unique(np.concatenate([dataset.original_target(i).numpy().ravel() for i in range(3)])))
    assert seen == {0, 1, 2, 3, 255}  # stored 1..4 and 0 (other)


def test_ade20k_trains_and_scores_at_the_original_size(tiny_config, tmp_path):
    data = write_ade20k(tmp_path)
    cfg = tiny_config(**{'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2, 'train_cfg.val_at_start': False})
    cfg.tasks = {'seg': ade20k_task(data, cfg.tasks['seg'])}
    cfg.tasks['seg']['val_batch_size'] = 2  # two batches: the rows must find their own ground truth
    trainer = Trainer(cfg, tmp_path / 'work')
    results = trainer.train()

    dataset = trainer.tasks['seg'].val_dataset
    predictions, truths = [], []
    for index, (image, label_map) in enumerate(dataset.samples):
        truths.append(reduce_zero_label(cv2.imread(str(label_map), cv2.IMREAD_UNCHANGED)))
        logits = resize_bilinear(model_outputs(trainer.model, 'seg', dataset, index), truths[-1].shape)
        predictions.append(logits.argmax(axis=0))
    assert [truth.shape for truth in truths] == SIZES['validation']
    assert results['seg']['mIoU'] == pytest.approx(miou_reference(predictions, truths), abs=1e-9)
    correct = sum(np.sum((p == t) & (t != 255)) for p, t in zip(predictions, truths))
    assert results['seg']['aAcc'] == pytest.approx(100 * correct / sum(np.sum(t != 255) for t in truths))


def test_depth_scores_at_the_original_size(tiny_config, tmp_path):
    """NYUv2-style depth (uint16 millimetres, 0 = no measurement) at the same mixed sizes."""
    rng = np.random.default_rng(1)
    nyu = tmp_path / 'nyu'
    for split, sizes in SIZES.items():
        for number, (height, width) in enumerate(sizes):
            millimetres = rng.integers(500, 9000, (height, width)).astype(np.uint16)
            millimetres[rng.random((height, width)) < 0.1] = 0
            for folder, suffix, array in (('rgb', 'jpg', rng.integers(0, 255, (height, width, 3), dtype=np.uint8)),
                                          ('depth', 'png', millimetres)):
                (nyu / split / folder).mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(nyu / split / folder / f'{number:06d}.{suffix}'), array)
    cfg = tiny_config(**{'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2, 'train_cfg.val_at_start': False})
    depth = cfg.tasks['depth']
    depth['train_dataset'].update(img_dir=str(nyu / 'training/rgb'), depth_dir=str(nyu / 'training/depth'),
                                  pipeline=[dict(type='Resize', size=(64, 64))] + depth['train_dataset']['pipeline'])
    depth['val_dataset'].update(img_dir=str(nyu / 'validation/rgb'), depth_dir=str(nyu / 'validation/depth'))
    depth['val_batch_size'] = 2
    cfg.tasks = {'depth': depth}
    trainer = Trainer(cfg, tmp_path / 'work')
    results = trainer.train()['depth']

    dataset, head = trainer.tasks['depth'].val_dataset, trainer.model.heads['depth']
    errors = dict(abs_rel=[], rmse=[], delta1=[])
    for index, (_, depth_path) in enumerate(dataset.samples):
        truth = cv2.imread(str(depth_path), cv2.IMREAD_UNCHANGED) / 1000.0
        log_depth = resize_bilinear(model_outputs(trainer.model, 'depth', dataset, index), truth.shape)[0]
        valid = (truth > 1e-3) & (truth < 20.0)  # the metric's min_depth and max_depth
        prediction, truth = np.clip(np.exp(log_depth[valid]), head.min_depth, head.max_depth), truth[valid]
        errors['abs_rel'].append(np.mean(np.abs(prediction - truth) / truth))
        errors['rmse'].append(np.sqrt(np.mean((prediction - truth) ** 2)))
        errors['delta1'].append(np.mean(np.maximum(prediction / truth, truth / prediction) < 1.25))
    assert {key: results[key] for key in errors} == pytest.approx(
        {key: np.mean(values) for key, values in errors.items()}, rel=1e-5)




def test_check_data_on_ade20k(tiny_config, tmp_path, capsys, restore_logging, load_tool):
    data = write_ade20k(tmp_path)
    config = tmp_path / 'config.py'
    config.write_text(f'tasks = {dict(seg=ade20k_task(data, tiny_config().tasks["seg"]))!r}\n')
    tool = load_tool('check_data')
    assert tool.main([str(config)]) == 0
    assert capsys.readouterr().out.strip() == 'no problems found'

    missing = data / 'annotations' / 'validation' / 'ADE_val_00000002.png'
    missing.unlink()
    assert tool.main([str(config)]) == 1
    printed = capsys.readouterr().out
    assert str(missing) in printed and 'has no label map' in printed
    assert printed.rstrip().endswith('1 error and 0 warnings in 1 dataset')
