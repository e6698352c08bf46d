import math

import numpy as np
import pytest
import torch

from mtvision.registry import METRICS


def _build(num_classes):
    return METRICS.build(dict(type='SegmentationMetric', num_classes=num_classes), default_args=dict(dataset=None))


def test_toy_confusion_matrix_by_hand():
    # 4 classes; class 3 appears nowhere; the 255 pixel is ignored even though the prediction there is 2
    target = torch.tensor([[[0, 0, 1, 1]], [[2, 2, 255, 1]]])
    prediction = torch.tensor([[[0, 1, 1, 1]], [[2, 0, 2, 1]]])
    metric = _build(4)
    metric.update(prediction[:1], target[:1])
    metric.update(prediction[1:], target[1:])
    # class 0: tp 1, 2 true, 2 predicted -> IoU 1/3, acc 1/2
    # class 1: tp 3, 3 true, 4 predicted -> IoU 3/4, acc 1
    # class 2: tp 1, 2 true, 1 predicted -> IoU 1/2, acc 1/2
    iou = metric.per_class_iou()
    assert iou[:3].tolist() == pytest.approx([100 / 3, 75.0, 50.0])
    assert math.isnan(iou[3])
    assert metric.compute() == pytest.approx({
        'mIoU': 100 * (1 / 3 + 3 / 4 + 1 / 2) / 3,
        'mAcc': 100 * (1 / 2 + 1 + 1 / 2) / 3,
        'aAcc': 100 * 5 / 7,
    })


def test_class_predicted_but_absent_from_truth_counts_in_miou_not_in_macc():
    metric = _build(2)
    metric.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]))
    # class 1: IoU 0 / 1 = 0 is defined, its accuracy 0 / 0 is not
    assert metric.compute() == pytest.approx({'mIoU': (50.0 + 0.0) / 2, 'mAcc': 50.0, 'aAcc': 50.0})


def test_random_maps_against_pixel_loop():
    generator = torch.Generator().manual_seed(0)
    num_classes = 5
    target = torch.randint(0, num_classes, (3, 7, 9), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = 255
    target[target == 4] = 1  # class 4 is then only ever predicted
    prediction = torch.randint(0, num_classes, (3, 7, 9), generator=generator)
    metric = _build(num_classes)
    metric.update(prediction, target)

    ious, accs, correct = [], [], 0
    for c in range(num_classes):
        true_c = [t == c for t in target.flatten().tolist() if t != 255]
        pred_c = [p == c for t, p in zip(target.flatten().tolist(), prediction.flatten().tolist()) if t != 255]
        both = sum(t and p for t, p in zip(true_c, pred_c))
        either = sum(t or p for t, p in zip(true_c, pred_c))
        if either:
            ious.append(both / either)
        if sum(true_c):
            accs.append(both / sum(true_c))
        correct += both
    total = int((target != 255).sum())
    assert metric.compute() == pytest.approx({
        'mIoU': 100 * np.mean(ious), 'mAcc': 100 * np.mean(accs), 'aAcc': 100 * correct / total})


def test_reset_and_bad_labels():
    metric = _build(3)
    metric.update(torch.tensor([[[1]]]), torch.tensor([[[2]]]))
    metric.reset()
    assert all(math.isnan(value) for value in metric.compute().values())
    with pytest.raises(ValueError, match=r'ground-truth label 7 is outside \[0, 3\)'):
        metric.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 7]]]))
    with pytest.raises(ValueError, match='one shape'):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))


def test_images_of_different_sizes_against_mmseg_intersect_and_union():
    """mmseg's IoUMetric on original-size maps: per image, histograms of the intersection, prediction and label
    over the non-ignored pixels, summed over the set; IoU nan where the union is empty, mIoU their nanmean, aAcc the
    total intersection over the total label area, Acc over classes with label pixels."""
    rng = np.random.default_rng(0)
    num_classes = 6  # class 5 appears nowhere (nan), class 4 is only ever predicted
    sizes = [(70, 90), (64, 48), (33, 17)]
    truths = [np.where(rng.random(size) < 0.15, 255, rng.integers(0, 4, size)) for size in sizes]
    predictions = [np.where(rng.random(t.shape) < 0.7, np.where(t == 255, 0, t), rng.integers(0, 5, t.shape))
                   for t in truths]
    metric = _build(num_classes)
    for prediction, truth in zip(predictions, truths):  # one image at a time, as the evaluator updates
        metric.update(torch.from_numpy(prediction)[None], torch.from_numpy(truth)[None])

    bins = dict(bins=num_classes, range=(0, num_classes))
    area_intersect, area_pred, area_label = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for prediction, truth in zip(predictions, truths):
        valid = truth != 255
        prediction, truth = prediction[valid], truth[valid]
        area_intersect += np.histogram(prediction[prediction == truth], **bins)[0]
        area_pred += np.histogram(prediction, **bins)[0]
        area_label += np.histogram(truth, **bins)[0]
    with np.errstate(invalid='ignore'):
        iou = area_intersect / (area_pred + area_label - area_intersect)
        acc = area_intersect / area_label
    assert np.isnan(iou[5]) and iou[4] == 0 and np.isnan(acc[4])
    np.testing.assert_allclose(metric.per_class_iou().numpy(), 100 * iou)
    assert metric.compute() == pytest.approx({'mIoU': 100 * np.nanmean(iou), 'mAcc': 100 * np.nanmean(acc),
                                              'aAcc': 100 * area_intersect.sum() / area_label.sum()})
