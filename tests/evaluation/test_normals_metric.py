import math

import numpy as np
import pytest
import torch

from mtvision.registry import METRICS

KEYS = {'mean', 'median', 'within_11.25', 'within_22.5', 'within_30'}


def reference(prediction, target):
    """Eigen & Fergus's protocol with numpy: arccos of the clipped cosine of the normalised vectors over every
    valid pixel of the set, numpy's exact median."""
    p = np.moveaxis(prediction, 1, -1).reshape(-1, 3)
    g = np.moveaxis(target, 1, -1).reshape(-1, 3)
    valid = np.linalg.norm(g, axis=1) > 0.5
    p, g = p[valid], g[valid]
    cosine = (p * g).sum(axis=1) / np.linalg.norm(p, axis=1) / np.linalg.norm(g, axis=1)
    errors = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
    return {'mean': errors.mean(), 'median': np.median(errors),
            **{f'within_{t:g}': 100 * np.mean(errors < t) for t in (11.25, 22.5, 30.0)}}


def noisy_normals(rng, shape=(3, 3, 7, 9), noise=0.4):
    target = rng.normal(size=shape)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    prediction = target + noise * rng.normal(size=shape)
    target[rng.random((shape[0], 1, *shape[2:])).repeat(3, axis=1) < 0.2] = 0  # missing normals
    return prediction, target


def test_hand_computed_angles():
    # 0, 45, 90 and 180 degrees; the fifth pixel has no ground truth
    target = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.float64)
    prediction = torch.tensor([[0, 0, 2], [1, 0, 1], [0, 0, 1], [0, -1, 0], [1, 0, 0]], dtype=torch.float64)
    metric = METRICS.build(dict(type='NormalsMetric'), default_args=dict(dataset=None))
    metric.update(prediction.T.reshape(1, 3, 1, 5), target.T.reshape(1, 3, 1, 5))
    scores = metric.compute()
    assert scores['mean'] == pytest.approx((0 + 45 + 90 + 180) / 4)
    assert scores['median'] == pytest.approx(67.5, abs=0.01)
    assert scores['within_11.25'] == scores['within_22.5'] == scores['within_30'] == 25.0


def test_random_batches_against_numpy():
    rng = np.random.default_rng(0)
    prediction, target = noisy_normals(rng)
    metric = METRICS.build(dict(type='NormalsMetric'))
    metric.update(torch.from_numpy(prediction[:1]), torch.from_numpy(target[:1]))
    metric.update(torch.from_numpy(prediction[1:]), torch.from_numpy(target[1:]))
    expected, scores = reference(prediction, target), metric.compute()
    assert set(scores) == KEYS
    assert {k: v for k, v in scores.items() if k != 'median'} == pytest.approx(
        {k: v for k, v in expected.items() if k != 'median'}, rel=1e-9)
    assert scores['median'] == pytest.approx(expected['median'], abs=0.01)  # one 0.01-degree bin


def test_small_errors_keep_their_precision_in_float32():
    # 0.05 degrees: arccos of a float32 cosine could not tell it from 0
    angle = math.radians(0.05)
    target = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1).repeat(1, 1, 1, 4)
    prediction = torch.tensor([math.sin(angle), 0.0, math.cos(angle)]).reshape(1, 3, 1, 1).repeat(1, 1, 1, 4)
    metric = METRICS.build(dict(type='NormalsMetric'))
    metric.update(prediction, target)
    assert metric.compute()['mean'] == pytest.approx(0.05, rel=1e-4)
    assert metric.compute()['median'] == pytest.approx(0.05, abs=0.01)


def test_median_of_many_pixels_is_within_half_a_bin_and_merging_is_exact():
    rng = np.random.default_rng(1)
    prediction, target = noisy_normals(rng, shape=(6, 3, 20, 30), noise=0.3)
    whole = METRICS.build(dict(type='NormalsMetric'))
    whole.update(torch.from_numpy(prediction), torch.from_numpy(target))
    assert whole.compute()['median'] == pytest.approx(reference(prediction, target)['median'], abs=0.01)
    shards = [METRICS.build(dict(type='NormalsMetric')) for _ in range(2)]
    for rank, shard in enumerate(shards):
        shard.update(torch.from_numpy(prediction[rank::2]), torch.from_numpy(target[rank::2]))
    shards[1].merge([shard.state() for shard in shards])
    merged = shards[1].compute()
    assert merged['median'] == whole.compute()['median']  # the same counts, hence the same number
    assert merged == pytest.approx(whole.compute(), rel=1e-12)


def test_coarse_bins_bound_the_median_error():
    rng = np.random.default_rng(2)
    prediction, target = noisy_normals(rng)
    metric = METRICS.build(dict(type='NormalsMetric', bin_width=1.0))
    metric.update(torch.from_numpy(prediction), torch.from_numpy(target))
    assert metric.compute()['median'] == pytest.approx(reference(prediction, target)['median'], abs=1.0)


def test_a_prediction_without_direction_counts_as_90_degrees():
    target = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1)
    metric = METRICS.build(dict(type='NormalsMetric'))
    metric.update(torch.zeros(1, 3, 1, 1), target)
    metric.update(torch.full((1, 3, 1, 1), float('nan')), target)
    assert metric.compute()['mean'] == 90.0


def test_empty_and_bad_input():
    metric = METRICS.build(dict(type='NormalsMetric'))
    metric.update(torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    assert set(metric.compute()) == KEYS and all(math.isnan(value) for value in metric.compute().values())
    with pytest.raises(ValueError, match=r'predictions \(1, 3, 2, 2\) and targets \(1, 3, 4, 4\)'):
        metric.update(torch.ones(1, 3, 2, 2), torch.ones(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r'must be normals \[B, 3, H, W\], got shape \[1, 1, 2, 2\]'):
        metric.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match='bin_width'):
        METRICS.build(dict(type='NormalsMetric', bin_width=0))
