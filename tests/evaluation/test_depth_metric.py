import math

import numpy as np
import pytest
import torch

from mtvision.registry import METRICS

KEYS = {'abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'log10', 'silog', 'delta1', 'delta2', 'delta3'}


def _errors(g, p):
    """BTS's compute_errors (cleinc/bts pytorch/bts_eval.py) on the valid pixels of one image."""
    ratio = np.maximum(g / p, p / g)
    e = np.log(p) - np.log(g)
    return dict(abs_rel=np.mean(np.abs(g - p) / g), sq_rel=np.mean((g - p) ** 2 / g),
                rmse=np.sqrt(np.mean((g - p) ** 2)), rmse_log=np.sqrt(np.mean(e ** 2)),
                log10=np.mean(np.abs(np.log10(p) - np.log10(g))),
                silog=100 * np.sqrt(np.mean(e ** 2) - np.mean(e) ** 2),
                delta1=np.mean(ratio < 1.25), delta2=np.mean(ratio < 1.25 ** 2), delta3=np.mean(ratio < 1.25 ** 3))


def _reference(prediction, target, min_depth, max_depth, box=None, median_scaling=False):
    """Per-image errors with boolean indexing, averaged over images that have valid pixels; ``box`` a
    (top, bottom, left, right) slice of pixels evaluated."""
    per_image = []
    for pred, gt in zip(prediction.reshape(len(prediction), *prediction.shape[-2:]),
                        target.reshape(len(target), *target.shape[-2:])):
        valid = gt > min_depth
        if max_depth is not None:
            valid &= gt < max_depth
        if box is not None:
            inside = np.zeros_like(valid)
            inside[box[0]:box[1], box[2]:box[3]] = True
            valid &= inside
        if not valid.any():
            continue
        p, g = pred[valid], gt[valid]
        if median_scaling:
            p = p * np.median(g) / np.median(p)
        per_image.append(_errors(g, np.clip(p, min_depth, max_depth if max_depth is not None else np.inf)))
    return {key: np.mean([errors[key] for errors in per_image]) for key in KEYS}


def test_hand_computed_single_image():
    target = torch.tensor([2.0, 4.0, 0.0]).reshape(1, 1, 1, 3)
    prediction = torch.tensor([1.0, 4.4, 7.0]).reshape(1, 1, 1, 3)
    metric = METRICS.build(dict(type='DepthMetric'), default_args=dict(dataset=None))
    metric.update(prediction, target)
    # the third pixel has no ground truth; ratios 2 (above 1.25 ** 3 = 1.95) and 1.1, log errors ln(1/2), ln(1.1)
    e = np.array([math.log(0.5), math.log(1.1)])
    assert metric.compute() == pytest.approx(dict(
        abs_rel=(0.5 + 0.1) / 2, sq_rel=(1 / 2 + 0.16 / 4) / 2, rmse=math.sqrt((1 + 0.16) / 2),
        rmse_log=math.sqrt(np.mean(e ** 2)), log10=(math.log10(2) + math.log10(1.1)) / 2,
        silog=100 * np.std(e), delta1=0.5, delta2=0.5, delta3=0.5))


def test_random_batches_against_numpy_with_invalid_and_clamped_pixels():
    rng = np.random.default_rng(0)
    target = rng.uniform(0.5, 10.0, size=(4, 1, 5, 6))
    target[rng.random(target.shape) < 0.3] = 0.0  # missing depth
    target[3] = 0.0  # an image without any valid pixel is skipped
    prediction = rng.uniform(-1.0, 12.0, size=target.shape)  # some below min_depth, some above max_depth
    metric = METRICS.build(dict(type='DepthMetric', min_depth=0.1, max_depth=8.0))
    metric.update(torch.from_numpy(prediction[:2]).float(), torch.from_numpy(target[:2]).float())
    metric.update(torch.from_numpy(prediction[2:]).float(), torch.from_numpy(target[2:]).float())
    expected = _reference(prediction.astype(np.float32).astype(np.float64),
                          target.astype(np.float32).astype(np.float64), 0.1, 8.0)
    assert metric.compute() == pytest.approx(expected, rel=1e-9)
    # without max_depth the far pixels count and predictions are not capped, so the numbers change accordingly
    unbounded = METRICS.build(dict(type='DepthMetric', min_depth=0.1))
    unbounded.update(torch.from_numpy(prediction), torch.from_numpy(target))
    assert unbounded.compute() == pytest.approx(_reference(prediction, target, 0.1, None), rel=1e-9)


def nyu_like(rng, num_images=2, height=480, width=640):
    target = rng.uniform(0.3, 12.0, size=(num_images, 1, height, width))  # some beyond NYUv2's 10 m cap
    target[rng.random(target.shape) < 0.2] = 0.0
    return target, target * rng.lognormal(0.0, 0.3, size=target.shape)


def test_eigen_crop_on_the_original_480x640_grid():
    rng = np.random.default_rng(1)
    target, prediction = nyu_like(rng)
    # a border of wild predictions that the crop must leave out: rows < 45 or >= 471, columns < 41 or >= 601
    prediction[..., :45, :] = prediction[..., 471:, :] = 50.0
    prediction[..., :, :41] = prediction[..., :, 601:] = 50.0
    metric = METRICS.build(dict(type='DepthMetric', max_depth=10.0, crop='eigen'))
    metric.update(torch.from_numpy(prediction), torch.from_numpy(target))
    expected = _reference(prediction, target, 1e-3, 10.0, box=(45, 471, 41, 601))
    assert metric.compute() == pytest.approx(expected, rel=1e-9)
    assert metric.compute()['delta1'] > 0.5  # the wild border did not count
    with pytest.raises(ValueError, match='480x640 NYUv2 grid but the ground truth is 240x320'):
        metric.update(torch.ones(1, 1, 240, 320), torch.ones(1, 1, 240, 320))


def test_garg_crop_takes_fractions_of_any_size():
    rng = np.random.default_rng(2)
    target, prediction = nyu_like(rng, height=37, width=124)
    metric = METRICS.build(dict(type='DepthMetric', max_depth=80.0, crop='garg'))
    metric.update(torch.from_numpy(prediction), torch.from_numpy(target))
    # Garg et al.'s box as BTS and Monodepth2 truncate it: rows 15:36, columns 4:119 of 37x124
    expected = _reference(prediction, target, 1e-3, 80.0, box=(15, 36, 4, 119))
    assert metric.compute() == pytest.approx(expected, rel=1e-9)


def test_median_scaling_removes_a_global_scale():
    rng = np.random.default_rng(3)
    target, prediction = nyu_like(rng, num_images=3, height=6, width=7)
    prediction[1] *= 40.0  # each image has its own scale, as a self-supervised network's output
    metric = METRICS.build(dict(type='DepthMetric', max_depth=10.0, median_scaling=True))
    metric.update(torch.from_numpy(prediction), torch.from_numpy(target))
    expected = _reference(prediction, target, 1e-3, 10.0, median_scaling=True)
    assert metric.compute() == pytest.approx(expected, rel=1e-9)
    scaled = METRICS.build(dict(type='DepthMetric', max_depth=10.0, median_scaling=True))
    scaled.update(torch.from_numpy(target * 3.0), torch.from_numpy(target))
    assert scaled.compute()['abs_rel'] == pytest.approx(0.0, abs=1e-12)


def test_non_finite_predictions_are_clamped_as_bts_does():
    target = torch.tensor([2.0, 4.0]).reshape(1, 1, 1, 2)
    metric = METRICS.build(dict(type='DepthMetric', max_depth=10.0))
    metric.update(torch.tensor([float('nan'), float('inf')]).reshape(1, 1, 1, 2), target)
    expected = _reference(np.array([1e-3, 10.0]).reshape(1, 1, 1, 2), target.numpy(), 1e-3, 10.0)
    assert metric.compute() == pytest.approx(expected)


def test_images_weigh_equally_whatever_their_valid_pixel_count():
    target = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 1, 1, 4)
    prediction = torch.tensor([[2.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 1, 1, 4)
    metric = METRICS.build(dict(type='DepthMetric'))
    metric.update(prediction, target)
    # image 1: abs_rel 1, rmse 1, delta1 0; image 2: perfect. Pooling pixels would give abs_rel 1/5 instead.
    assert {key: metric.compute()[key] for key in ('abs_rel', 'rmse', 'delta1')} == pytest.approx(
        dict(abs_rel=0.5, rmse=0.5, delta1=0.5))


def test_merged_shards_equal_one_pass():
    rng = np.random.default_rng(4)
    target, prediction = nyu_like(rng, num_images=4, height=5, width=6)
    whole, shards = METRICS.build(dict(type='DepthMetric')), [METRICS.build(dict(type='DepthMetric'))
                                                              for _ in range(2)]
    whole.update(torch.from_numpy(prediction), torch.from_numpy(target))
    for rank, shard in enumerate(shards):
        shard.update(torch.from_numpy(prediction[rank::2]), torch.from_numpy(target[rank::2]))
    shards[0].merge([shard.state() for shard in shards])
    assert shards[0].compute() == pytest.approx(whole.compute(), rel=1e-12)


def test_empty_and_bad_input():
    metric = METRICS.build(dict(type='DepthMetric'))
    metric.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert set(metric.compute()) == KEYS and all(math.isnan(value) for value in metric.compute().values())
    with pytest.raises(ValueError, match=r'predictions \(1, 1, 2, 2\) and targets \(1, 1, 4, 4\)'):
        metric.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match='max_depth'):
        METRICS.build(dict(type='DepthMetric', min_depth=1.0, max_depth=0.5))
    with pytest.raises(ValueError, match="crop must be one of .* got 'kitti'"):
        METRICS.build(dict(type='DepthMetric', crop='kitti'))
    with pytest.raises(ValueError, match='min_depth must be positive'):
        METRICS.build(dict(type='DepthMetric', min_depth=0.0))
