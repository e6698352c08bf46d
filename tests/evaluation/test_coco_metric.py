import copy
import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mtvision.registry import METRICS

CAT_IDS = [1, 3, 7]  # contiguous labels 0, 1, 2
KEYS = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')
# image id -> original (h, w) and the (H, W) the network saw: x and y are scaled by different factors
ORIG_SIZE = {1: (200, 300), 2: (480, 640), 5: (100, 100)}
INPUT_SIZE = {1: (100, 400), 2: (256, 256), 5: (64, 128)}
GROUND_TRUTH = [  # image id, category id, xywh in original pixels
    (1, 1, [10, 20, 50, 40]),     # medium
    (2, 3, [100, 100, 200, 150]),  # large
    (2, 7, [5, 5, 20, 20]),       # small
    (2, 1, [300, 200, 60, 80]),   # medium
    (5, 3, [0, 0, 50, 50]),       # medium
]
RESULTS = [  # image id, category id, xywh in original pixels, score
    (1, 1, [12, 22, 48, 38], 0.9),    # hit
    (1, 3, [200, 100, 40, 40], 0.6),  # false positive
    (1, 1, [150, 50, 30, 30], 0.3),   # false positive
    (2, 3, [105, 95, 195, 160], 0.8),  # hit at IoU 0.5, not at 0.95
    (2, 1, [300, 200, 60, 80], 0.95),  # exact; the small cat-7 box is missed
    (2, 7, [400, 400, 20, 20], 0.5),  # false positive
    (5, 3, [10, 10, 50, 50], 0.7),    # IoU 0.47: a false positive and a miss
]


@pytest.fixture
def dataset(tmp_path):
    return write_ground_truth(tmp_path, ORIG_SIZE)


def write_ground_truth(tmp_path, image_sizes):
    """The ground truth of the images ``image_sizes`` names, as the metric's dataset."""
    annotations = dict(
        images=[dict(id=image_id, height=h, width=w, file_name=f'{image_id}.jpg')
                for image_id, (h, w) in image_sizes.items()],
        categories=[dict(id=cat_id, name=f'cat{cat_id}') for cat_id in CAT_IDS],
        annotations=[dict(id=index + 1, image_id=image_id, category_id=cat_id, bbox=box, area=box[2] * box[3],
                          iscrowd=0) for index, (image_id, cat_id, box) in enumerate(GROUND_TRUTH)
                     if image_id in image_sizes],
    )
    path = tmp_path / 'instances_val.json'
    path.write_text(json.dumps(annotations))
    return SimpleNamespace(coco=COCO(str(path)), cat_ids=CAT_IDS, ann_file=str(path))


def _batch(image_ids, boxes_by_image):
    """Head predictions and batch targets, boxes mapped from original xywh to input-pixel xyxy."""
    predictions, targets = [], []
    for image_id in image_ids:
        (h, w), (input_h, input_w) = ORIG_SIZE[image_id], INPUT_SIZE[image_id]
        rows = [(cat_id, box, score) for i, cat_id, box, score in boxes_by_image if i == image_id]
        xyxy = [[x * input_w / w, y * input_h / h, (x + bw) * input_w / w, (y + bh) * input_h / h]
                for _, (x, y, bw, bh), _ in rows]
        predictions.append(dict(boxes=torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
                                scores=torch.tensor([score for *_, score in rows]),
                                labels=torch.tensor([CAT_IDS.index(cat_id) for cat_id, *_ in rows],
                                                    dtype=torch.long)))
        targets.append(dict(image_id=image_id, orig_size=(h, w), input_size=(input_h, input_w)))
    return predictions, targets


def _pycocotools(dataset, results, image_ids=None):
    coco_gt = COCO(dataset.ann_file)
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), 'bbox')
    if image_ids is not None:
        coco_eval.params.imgIds = image_ids
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return {key: 100 * stat for key, stat in zip(KEYS, coco_eval.stats)}


def _result_dicts(rows):
    return [dict(image_id=i, category_id=c, bbox=box, score=score) for i, c, box, score in rows]


def test_matches_pycocotools_on_the_same_results(dataset):
    metric = METRICS.build(dict(type='COCODetectionMetric'), default_args=dict(dataset=dataset))
    for image_ids in ([1, 2], [5]):
        metric.update(*_batch(image_ids, RESULTS))
    computed = metric.compute()
    expected = _pycocotools(dataset, _result_dicts(RESULTS))
    assert 0 < expected['mAP'] < 100  # the case exercises misses and false positives
    assert computed == pytest.approx(expected, rel=1e-6)


def test_every_image_of_the_ann_file_is_evaluated(dataset, caplog):
    """An image the loader dropped counts as one without detections (COCO's protocol), not as absent: scoring only
    the images seen would inflate AP."""
    seen = [row for row in RESULTS if row[0] == 2]
    metric = METRICS.build(dict(type='COCODetectionMetric'), default_args=dict(dataset=dataset))
    metric.update(*_batch([2], RESULTS))
    with caplog.at_level(logging.WARNING, logger='mtvision.evaluation.detection'):
        computed = metric.compute()
    assert '2 of the 3 images' in caplog.text and 'ids 1, 5' in caplog.text and str(dataset.ann_file) in caplog.text
    # pycocotools directly, on the same json: every image (its default imgIds) with the seen image's results
    expected = _pycocotools(dataset, _result_dicts(seen))
    assert computed == pytest.approx(expected, rel=1e-6, nan_ok=True)
    only_seen = _pycocotools(dataset, _result_dicts(seen), image_ids=[2])
    assert computed['mAP'] < only_seen['mAP'], 'the case must be one where leaving images out inflates AP'

    # an image passed with no detections is scored like a dropped one, and both lower AP against the full pass
    emptied = METRICS.build(dict(type='COCODetectionMetric'), default_args=dict(dataset=dataset))
    emptied.update(*_batch([1, 2, 5], [row for row in RESULTS if row[0] != 1]))
    dropped = METRICS.build(dict(type='COCODetectionMetric'), default_args=dict(dataset=dataset))
    dropped.update(*_batch([2, 5], RESULTS))
    full = METRICS.build(dict(type='COCODetectionMetric'), default_args=dict(dataset=dataset))
    full.update(*_batch([1, 2, 5], RESULTS))
    expected = _pycocotools(dataset, _result_dicts([row for row in RESULTS if row[0] != 1]))
    assert emptied.compute() == pytest.approx(expected, rel=1e-6)
    assert dropped.compute() == pytest.approx(expected, rel=1e-6)
    assert expected['mAP'] < full.compute()['mAP']


def test_perfect_predictions_score_100_after_rescaling(dataset):
    perfect = [(image_id, cat_id, box, 1.0) for image_id, cat_id, box in GROUND_TRUTH]
    metric = METRICS.build(dict(type='COCODetectionMetric'), default_args=dict(dataset=dataset))
    metric.update(*_batch([1, 2, 5], perfect))
    assert metric.compute() == pytest.approx(dict.fromkeys(KEYS, 100.0))


def test_area_range_without_ground_truth_is_nan(tmp_path):
    dataset = write_ground_truth(tmp_path, {5: ORIG_SIZE[5]})  # one medium box, no small or large one
    metric = METRICS.build(dict(type='COCODetectionMetric'), default_args=dict(dataset=dataset))
    metric.update(*_batch([5], [(5, 3, [0, 0, 50, 50], 1.0)]))
    result = metric.compute()
    assert result['mAP'] == pytest.approx(100.0) and result['mAP_m'] == pytest.approx(100.0)
    assert math.isnan(result['mAP_s']) and math.isnan(result['mAP_l'])


def test_no_predictions_give_zeros(dataset):
    metric = METRICS.build(dict(type='COCODetectionMetric'), default_args=dict(dataset=dataset))
    assert metric.compute() == dict.fromkeys(KEYS, 0.0)
    metric.update(*_batch([1, 2], []))
    assert metric.compute() == dict.fromkeys(KEYS, 0.0)


def test_pycocotools_output_goes_to_debug_log_not_stdout(dataset, capsys, caplog):
    metric = METRICS.build(dict(type='COCODetectionMetric'), default_args=dict(dataset=dataset))
    metric.update(*_batch([1], RESULTS))
    capsys.readouterr()
    with caplog.at_level(logging.DEBUG, logger='mtvision.evaluation.detection'):
        metric.compute()
    assert capsys.readouterr().out == ''
    assert 'Average Precision' in caplog.text


def test_bad_input_is_named(dataset):
    metric = METRICS.build(dict(type='COCODetectionMetric'), default_args=dict(dataset=dataset))
    predictions, targets = _batch([1], RESULTS)
    predictions[0]['labels'][0] = 3
    with pytest.raises(ValueError, match='predicted label 3 for image_id 1'):
        metric.update(predictions, targets)
    predictions, targets = _batch([1], RESULTS)
    targets[0]['image_id'] = 99
    with pytest.raises(ValueError, match='image_id 99'):
        metric.update(predictions, targets)
    del targets[0]['input_size']
    with pytest.raises(KeyError, match='input_size'):
        metric.update(predictions, targets)
    with pytest.raises(ValueError, match='`coco`'):
        METRICS.build(dict(type='COCODetectionMetric'), default_args=dict(dataset=None))
