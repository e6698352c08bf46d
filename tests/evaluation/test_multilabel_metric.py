import math

import numpy as np
import pytest
import torch

from mtvision.evaluation.multilabel import average_precision
from mtvision.registry import METRICS

KEYS = {'mAP', 'f1_macro', 'precision_macro', 'recall_macro', 'f1_micro', 'precision_micro', 'recall_micro',
        'classes_without_positives'}


def reference_ap(scores, labels):
    """Step-wise AP by a plain loop over the distinct thresholds, highest first: precision at each threshold
    times the recall it adds (scikit-learn's average_precision_score)."""
    known = labels != -1
    scores, positive = scores[known], labels[known] == 1
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        selected = scores >= threshold
        precision = (selected & positive).sum() / selected.sum()
        recall = (selected & positive).sum() / positive.sum()
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return 100 * ap


def reference_f1(scores, labels, threshold=0.5):
    """Loop over classes: each class's confusion counts, then mmpretrain's macro and micro averages."""
    per_class, totals = [], np.zeros(3)
    for k in range(scores.shape[1]):
        known = labels[:, k] != -1
        predicted, actual = scores[known, k] >= threshold, labels[known, k] == 1
        counts = np.array([(predicted & actual).sum(), predicted.sum(), actual.sum()])
        per_class.append(counts)
        totals += counts

    def prf(tp, predicted, actual):
        p = 100 * tp / predicted if predicted else 0.0
        r = 100 * tp / actual if actual else 0.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0)

    macro = np.mean([prf(*counts) for counts in per_class], axis=0)
    micro = prf(*totals)
    return dict(precision_macro=macro[0], recall_macro=macro[1], f1_macro=macro[2],
                precision_micro=micro[0], recall_micro=micro[1], f1_micro=micro[2])


def random_set(rng, num_samples=40, num_classes=5, rounding=None):
    scores = rng.random((num_samples, num_classes))
    if rounding is not None:
        scores = scores.round(rounding)  # many ties
    labels = (rng.random((num_samples, num_classes)) < scores * 0.8).astype(np.int64)
    labels[rng.random(labels.shape) < 0.1] = -1
    labels[:, 3] = np.where(labels[:, 3] == 1, 0, labels[:, 3])  # a class without positives
    return scores, labels


def test_mmpretrain_docstring_example():
    # mmpretrain's AveragePrecision example: 70.833 with its 4th class (no positive) counted as 0, so the mean of
    # the three classes with positives is 70.833 * 4 / 3
    scores = torch.tensor([[0.9, 0.8, 0.3, 0.2], [0.1, 0.2, 0.2, 0.1], [0.7, 0.5, 0.9, 0.3], [0.8, 0.1, 0.1, 0.2]])
    labels = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]])
    metric = METRICS.build(dict(type='MultiLabelMetric'), default_args=dict(dataset=None))
    metric.update(scores, labels)
    scores_out = metric.compute()
    assert scores_out['mAP'] == pytest.approx((100 + 250 / 3 + 100) / 3)
    assert scores_out['classes_without_positives'] == 1.0


@pytest.mark.parametrize('rounding', [None, 1])
def test_random_batches_against_loops(rounding):
    rng = np.random.default_rng(0)
    scores, labels = random_set(rng, rounding=rounding)
    metric = METRICS.build(dict(type='MultiLabelMetric'))
    for start in range(0, len(scores), 16):
        metric.update(torch.from_numpy(scores[start:start + 16]).float(), torch.from_numpy(labels[start:start + 16]))
    scores32 = scores.astype(np.float32).astype(np.float64)
    aps = [reference_ap(scores32[:, k], labels[:, k]) for k in range(5) if k != 3]
    expected = dict(mAP=np.mean(aps), classes_without_positives=1.0, **reference_f1(scores32, labels))
    result = metric.compute()
    assert set(result) == KEYS
    assert result == pytest.approx(expected, rel=1e-9)


def test_ties_do_not_depend_on_the_order_of_samples():
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1])
    labels = torch.tensor([1, 0, 1, 0, 1])
    # thresholds 0.9 (P 1, R 1/3), 0.5 (P 2/4, R 2/3), 0.1 (P 3/5, R 1)
    expected = 100 * (1 / 3 * 1 + 1 / 3 * 2 / 4 + 1 / 3 * 3 / 5)
    for permutation in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 1, 4, 3]):
        assert average_precision(scores[permutation], labels[permutation]) == pytest.approx(expected)
    assert math.isnan(average_precision(scores, torch.tensor([0, 0, -1, 0, 0])))


def test_unknown_labels_count_nowhere():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.2]])
    with_unknown = METRICS.build(dict(type='MultiLabelMetric'))
    with_unknown.update(scores, torch.tensor([[1], [-1], [0], [1]]))
    without = METRICS.build(dict(type='MultiLabelMetric'))
    without.update(scores[[0, 2, 3]], torch.tensor([[1], [0], [1]]))
    assert with_unknown.compute() == pytest.approx(without.compute())


def test_merged_shards_equal_one_pass():
    rng = np.random.default_rng(1)
    scores, labels = random_set(rng, num_samples=30, rounding=1)
    whole = METRICS.build(dict(type='MultiLabelMetric'))
    whole.update(torch.from_numpy(scores), torch.from_numpy(labels))
    shards = [METRICS.build(dict(type='MultiLabelMetric')) for _ in range(3)]
    for rank, shard in enumerate(shards):
        shard.update(torch.from_numpy(scores[rank::3]), torch.from_numpy(labels[rank::3]))
    shards[2].merge([shard.state() for shard in shards])
    assert shards[2].compute() == pytest.approx(whole.compute(), rel=1e-12)


def test_threshold_decides_the_predicted_positives():
    rng = np.random.default_rng(2)
    scores, labels = random_set(rng)
    metric = METRICS.build(dict(type='MultiLabelMetric', threshold=0.3))
    metric.update(torch.from_numpy(scores), torch.from_numpy(labels))
    assert metric.compute() == pytest.approx(
        dict(metric.compute(), **reference_f1(scores, labels, threshold=0.3)), rel=1e-9)


def test_empty_and_bad_input():
    metric = METRICS.build(dict(type='MultiLabelMetric'))
    assert set(metric.compute()) == KEYS and all(math.isnan(value) for value in metric.compute().values())
    with pytest.raises(ValueError, match=r'predictions \(2, 3\) and targets \(2, 4\)'):
        metric.update(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r'target 0.5 at batch index 1, class 2 is not 1, 0 or -1'):
        metric.update(torch.zeros(2, 3), torch.tensor([[0, 1, 0], [1, 0, 0.5]]))
    metric.update(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match='got 4 classes after 3'):
        metric.update(torch.zeros(2, 4), torch.zeros(2, 4))
