import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mtvision.registry import METRICS

CAT_IDS = [1, 3]  # contiguous labels 0, 1
BOX_KEYS = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')
MASK_KEYS = ('mAP_segm', 'mAP_segm_50', 'mAP_segm_75', 'mAP_segm_s', 'mAP_segm_m', 'mAP_segm_l')
# image id -> original (h, w) and the (H, W) the network saw: image 1 at half its size
ORIG_SIZE = {1: (40, 60), 2: (32, 32)}
INPUT_SIZE = {1: (20, 30), 2: (32, 32)}


def block(size, rows, cols) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = 1
    return mask


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return dict(encoded, counts=encoded['counts'].decode())  # JSON-writable


def write_ground_truth(tmp_path):
    """Image 1: a triangle (polygon) and a square (polygon); image 2: two blocks (compressed RLE)."""
    polygons = [(1, 1, [10, 10, 40, 10, 10, 30]), (1, 3, [44, 20, 56, 20, 56, 32, 44, 32])]
    blocks = [(2, 3, block((32, 32), (4, 20), (6, 26))), (2, 1, block((32, 32), (24, 30), (2, 8)))]
    annotations = []
    for image_id, cat_id, polygon in polygons:
        h, w = ORIG_SIZE[image_id]
        encoded = mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))
        annotations.append(dict(image_id=image_id, category_id=cat_id, segmentation=[polygon],
                                area=float(mask_utils.area(encoded)), bbox=mask_utils.toBbox(encoded).tolist()))
    for image_id, cat_id, mask in blocks:
        encoded = rle(mask)
        annotations.append(dict(image_id=image_id, category_id=cat_id, segmentation=encoded,
                                area=float(mask.sum()), bbox=mask_utils.toBbox(encoded).tolist()))
    for index, annotation in enumerate(annotations):
        annotation.update(id=index + 1, iscrowd=0)
    path = tmp_path / 'instances_val.json'
    path.write_text(json.dumps(dict(
        images=[dict(id=image_id, height=h, width=w, file_name=f'{image_id}.jpg')
                for image_id, (h, w) in ORIG_SIZE.items()],
        categories=[dict(id=cat_id, name=f'cat{cat_id}') for cat_id in CAT_IDS], annotations=annotations)))
    return SimpleNamespace(coco=COCO(str(path)), cat_ids=CAT_IDS, ann_file=str(path))


# image id, category id, box xyxy in input pixels, score, mask at the input size (probabilities or binary)
PREDICTIONS = [
    # the triangle's box exactly, its mask the box's left half: box IoU 1, mask IoU about 0.6
    (1, 1, [5.0, 5.0, 20.0, 15.0], 0.9, block((20, 30), (5, 15), (5, 13)).astype(np.float32)),
    # the square, mask probabilities: 0.8 on the square, 0.3 around it
    (1, 3, [21.0, 9.0, 29.0, 17.0], 0.8,
     np.where(block((20, 30), (10, 16), (22, 28)) > 0, 0.8, block((20, 30), (9, 17), (21, 29)) * 0.3)),
    (1, 3, [0.0, 0.0, 6.0, 6.0], 0.4, block((20, 30), (0, 6), (0, 6)).astype(np.float32)),  # false positive
    # the large block, the box 3 px off but the mask exact
    (2, 3, [9.0, 4.0, 29.0, 20.0], 0.7, block((32, 32), (4, 20), (6, 26)).astype(np.float32)),
    (2, 1, [20.0, 2.0, 26.0, 8.0], 0.6, block((32, 32), (2, 8), (20, 26)).astype(np.float32)),  # miss
]


def batch(image_ids):
    predictions, targets = [], []
    for image_id in image_ids:
        rows = [row for row in PREDICTIONS if row[0] == image_id]
        predictions.append(dict(
            boxes=torch.tensor([box for _, _, box, _, _ in rows]), scores=torch.tensor([s for *_, s, _ in rows]),
            labels=torch.tensor([CAT_IDS.index(cat_id) for _, cat_id, *_ in rows]),
            masks=torch.from_numpy(np.stack([mask for *_, mask in rows]))[:, None].float()))
        targets.append(dict(image_id=image_id, orig_size=ORIG_SIZE[image_id], input_size=INPUT_SIZE[image_id]))
    return predictions, targets


def reference_results() -> tuple[list[dict], list[dict]]:
    """The predictions as COCO results by hand: boxes scaled to the original image, masks thresholded and (image 1)
    upscaled by pixel repetition, which is what a bilinear 2x upscaling thresholded at 0.5 gives."""
    boxes, masks = [], []
    for image_id, cat_id, (x1, y1, x2, y2), score, mask in PREDICTIONS:
        factor = ORIG_SIZE[image_id][0] // INPUT_SIZE[image_id][0]
        binary = np.kron(mask > 0.5, np.ones((factor, factor))).astype(np.uint8)
        boxes.append(dict(image_id=image_id, category_id=cat_id, score=score,
                          bbox=[x1 * factor, y1 * factor, (x2 - x1) * factor, (y2 - y1) * factor]))
        masks.append(dict(image_id=image_id, category_id=cat_id, score=score, segmentation=rle(binary)))
    return boxes, masks


def pycocotools_stats(dataset, results, iou_type):
    coco_gt = COCO(dataset.ann_file)
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return [100 * stat if stat >= 0 else float('nan') for stat in coco_eval.stats[:6]]


@pytest.fixture
def dataset(tmp_path):
    return write_ground_truth(tmp_path)


def test_box_and_mask_ap_equal_pycocotools_on_the_same_results(dataset):
    metric = METRICS.build(dict(type='COCOInstanceSegmentationMetric'), default_args=dict(dataset=dataset))
    metric.update(*batch([1, 2]))
    scores = metric.compute()

    box_results, mask_results = reference_results()
    assert [scores[key] for key in BOX_KEYS] == pytest.approx(pycocotools_stats(dataset, box_results, 'bbox'),
                                                              nan_ok=True)
    assert [scores[key] for key in MASK_KEYS] == pytest.approx(pycocotools_stats(dataset, mask_results, 'segm'),
                                                               nan_ok=True)
    assert scores['mAP_segm'] != pytest.approx(scores['mAP'])  # the masks count
    assert metric.primary_key == 'mAP_segm'


def test_merging_two_halves_equals_the_whole(dataset):
    def build():
        return METRICS.build(dict(type='COCOInstanceSegmentationMetric'), default_args=dict(dataset=dataset))

    whole, first, second, merged = build(), build(), build(), build()
    whole.update(*batch([1, 2]))
    first.update(*batch([1]))
    second.update(*batch([2]))
    merged.merge([first.state(), second.state()])
    assert merged.compute() == pytest.approx(whole.compute(), nan_ok=True)


def test_no_detections_score_zero(dataset):
    metric = METRICS.build(dict(type='COCOInstanceSegmentationMetric'), default_args=dict(dataset=dataset))
    empty = dict(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long),
                 masks=torch.zeros(0, 1, 32, 32))
    metric.update([empty], [dict(image_id=2, orig_size=(32, 32), input_size=(32, 32))])
    assert metric.compute() == dict.fromkeys(BOX_KEYS + MASK_KEYS, 0.0)


@pytest.mark.parametrize('masks, error, message', [
    (None, KeyError, 'image_id 2 has no masks'),
    (torch.zeros(2, 1, 16, 16), ValueError, r'image_id 2: masks must be \[D, 1, H, W\] = \[2, 1, 32, 32\]'),
])
def test_bad_masks_are_named(dataset, masks, error, message):
    metric = METRICS.build(dict(type='COCOInstanceSegmentationMetric'), default_args=dict(dataset=dataset))
    predictions, targets = batch([2])
    if masks is None:
        del predictions[0]['masks']
    else:
        predictions[0]['masks'] = masks
    with pytest.raises(error, match=message):
        metric.update(predictions, targets)
