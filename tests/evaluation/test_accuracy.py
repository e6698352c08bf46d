import math

import pytest
import torch

from mtvision.registry import METRICS

# per row: the true class, whether it is ranked first, whether it is among the first two (counted by hand)
SCORES = torch.tensor([[0.1, 0.7, 0.2],   # true 1: top1 hit
                       [0.5, 0.3, 0.2],   # true 1: ranked second
                       [0.2, 0.3, 0.5],   # true 0: ranked third
                       [0.6, 0.1, 0.3]])  # true 0: top1 hit
LABELS = torch.tensor([1, 1, 0, 0])


def test_accuracy_matches_hand_count_over_several_batches():
    metric = METRICS.build(dict(type='Accuracy', topk=(1, 2)), default_args=dict(dataset=None))
    metric.update(SCORES[:3], LABELS[:3])
    metric.update(SCORES[3:], LABELS[3:])
    assert metric.compute() == pytest.approx({'top1': 50.0, 'top2': 75.0})


def test_k_above_number_of_classes_is_clipped():
    metric = METRICS.build(dict(type='Accuracy'))
    metric.update(SCORES, LABELS)
    # three classes: 'top5' counts the three ranks there are, so every sample is a hit
    assert metric.compute() == pytest.approx({'top1': 50.0, 'top5': 100.0})


def test_reset_forgets_earlier_batches_and_empty_is_nan():
    metric = METRICS.build(dict(type='Accuracy', topk=(1,)))
    metric.update(SCORES, LABELS)
    metric.reset()
    assert math.isnan(metric.compute()['top1'])
    metric.update(SCORES[:1], LABELS[:1])
    assert metric.compute() == {'top1': 100.0}


def test_bad_input_is_named():
    metric = METRICS.build(dict(type='Accuracy'))
    with pytest.raises(ValueError, match=r'target 3 at batch index 1'):
        metric.update(SCORES[:2], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r'predictions \[B, K\] and targets \[B\]'):
        metric.update(SCORES, LABELS[:2])
    with pytest.raises(ValueError, match='positive integers'):
        METRICS.build(dict(type='Accuracy', topk=(0, 1)))
