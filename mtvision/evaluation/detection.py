"""COCO box and mask mAP through pycocotools."""
import contextlib
import io
import logging

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from mtvision.models.heads.mask_rcnn import resize_masks
from mtvision.registry import METRICS

logger = logging.getLogger(__name__)

# the order of COCOeval.stats[:6]
_STAT_KEYS = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')


@METRICS.register_module()
class COCODetectionMetric:
    """COCO box AP in percent, evaluated by pycocotools against the ground truth of the validation dataset.

    Predicted boxes (XYXY in input-image pixels) are mapped back to the original image with independent x and y
    factors ``orig_size / input_size`` and written as COCO results. Every image of the annotation file is
    evaluated, as COCO's protocol does (``COCOeval`` defaults ``params.imgIds`` to all images of the ground
    truth): an image the metric never saw, because the loader dropped it or the pass stopped early, counts as one
    for which the model found nothing, so its objects are misses and AP cannot rise by leaving images out. Such
    images are named in a warning. An image seen twice keeps its latest predictions. Without any predicted box
    every key is 0. A key that pycocotools cannot define (no ground truth in that area range) is ``nan``.

    Args:
        dataset: the validation ``CocoDetectionDataset``: ``dataset.coco`` is its pycocotools ``COCO`` and
            ``dataset.cat_ids[label]`` the category id of contiguous label ``label``.
        iou_type: only ``'bbox'``, as the detection head predicts boxes.
    """

    primary_key = 'mAP'
    higher_is_better = True

    def __init__(self, dataset=None, iou_type: str = 'bbox'):
        if iou_type != 'bbox':
            raise ValueError(f"COCODetectionMetric supports iou_type='bbox' only, got {iou_type!r}")
        if dataset is None or not hasattr(dataset, 'coco') or not hasattr(dataset, 'cat_ids'):
            raise ValueError(f'{type(self).__name__} needs the validation dataset with attributes `coco` '
                             f'(pycocotools COCO) and `cat_ids`, got {type(dataset).__name__}')
        self.iou_type = iou_type
        self.coco = dataset.coco
        self.cat_ids = [int(cat_id) for cat_id in dataset.cat_ids]
        self._source = str(getattr(dataset, 'ann_file', 'the ground truth'))  # named in warnings
        # the validation set as the annotation file defines it, whatever the loader delivers
        self._image_ids = sorted(self.coco.getImgIds())
        self._known_image_ids = set(self._image_ids)
        self.reset()

    def reset(self) -> None:
        self._results: dict[int, list[dict]] = {}

    def state(self) -> dict:
        return dict(results=self._results)

    def merge(self, states: list[dict]) -> None:
        """Become the metric of the union of the shards whose ``state()`` are ``states`` (this one's included)."""
        merged: dict[int, list[dict]] = {}
        for s in states:
            merged.update(s['results'])
        self._results = merged

    @torch.no_grad()
    def update(self, predictions: list[dict], targets: list[dict]) -> None:
        """Add a batch: per image, the head's ``dict(boxes, scores, labels)`` and the batch's target dict."""
        if len(predictions) != len(targets):
            raise ValueError(f'{len(predictions)} predictions for {len(targets)} targets')
        for index, (prediction, target) in enumerate(zip(predictions, targets)):
            for key in ('image_id', 'orig_size', 'input_size'):
                if key not in target:
                    raise KeyError(f'detection target at batch index {index} has no {key!r}')
            image_id = int(target['image_id'])
            if image_id not in self._known_image_ids:
                raise ValueError(f'image_id {image_id} (batch index {index}) is not in the ground truth of the '
                                 'metric dataset')
            self._results[image_id] = self._to_coco_results(image_id, prediction, target)

    def _to_coco_results(self, image_id: int, prediction: dict, target: dict) -> list[dict]:
        boxes = prediction['boxes'].detach().double().cpu().numpy().reshape(-1, 4)
        scores = prediction['scores'].detach().double().cpu().numpy().reshape(-1)
        labels = prediction['labels'].detach().cpu().numpy().reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f'prediction for image_id {image_id} has {len(boxes)} boxes, {len(scores)} scores and '
                             f'{len(labels)} labels')
        bad = (labels < 0) | (labels >= len(self.cat_ids))
        if bad.any():
            raise ValueError(f'predicted label {int(labels[bad][0])} for image_id {image_id} is outside the '
                             f'{len(self.cat_ids)} dataset classes')
        orig_h, orig_w = (float(size) for size in target['orig_size'])
        input_h, input_w = (float(size) for size in target['input_size'])
        boxes = boxes * np.array([orig_w / input_w, orig_h / input_h] * 2)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        return [dict(image_id=image_id, category_id=self.cat_ids[label], bbox=box.tolist(), score=float(score))
                for box, score, label in zip(xywh, scores, labels.tolist())]

    def compute(self) -> dict[str, float]:
        return self._evaluate(self._all_results(), self.iou_type)

    def _all_results(self) -> list[dict]:
        """Every stored COCO result, after warning about the images that have none."""
        unseen = [image_id for image_id in self._image_ids if image_id not in self._results]
        if unseen:
            logger.warning('%d of the %d images of %s had no predictions passed to the metric (ids %s): they are '
                           'evaluated as images without detections', len(unseen), len(self._image_ids),
                           self._source, _first_ids(unseen))
        return [result for image_results in self._results.values() for result in image_results]

    def _evaluate(self, results: list[dict], iou_type: str, keys: tuple[str, ...] = _STAT_KEYS) -> dict[str, float]:
        """COCOeval's first six stats of ``results`` for ``iou_type``, in percent, under ``keys``."""
        # copies, because loadRes adds keys to the dicts it is given
        results = [dict(result) for result in results]
        if not results:
            # pycocotools' loadRes fails on an empty list; with nothing predicted every AP is 0 anyway
            return dict.fromkeys(keys, 0.0)
        printed = io.StringIO()
        # pycocotools reports through print(); the numbers are returned, its text goes to the debug log
        with contextlib.redirect_stdout(printed):
            coco_eval = COCOeval(self.coco, self.coco.loadRes(results), iou_type)
            coco_eval.params.imgIds = self._image_ids
            coco_eval.params.catIds = self.cat_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        logger.debug('pycocotools output:\n%s', printed.getvalue())
        return {key: 100.0 * float(stat) if stat >= 0 else float('nan')
                for key, stat in zip(keys, coco_eval.stats)}


# the mask AP keys, in the order of COCOeval.stats[:6]; 'mAP...' names read as percent in the evaluator's tables
_MASK_STAT_KEYS = ('mAP_segm', 'mAP_segm_50', 'mAP_segm_75', 'mAP_segm_s', 'mAP_segm_m', 'mAP_segm_l')


@METRICS.register_module()
class COCOInstanceSegmentationMetric(COCODetectionMetric):
    """COCO box AP (``mAP``, ``mAP_50``, ...) and mask AP (``mAP_segm``, ``mAP_segm_50``, ...) in percent, by
    pycocotools against the ground truth of the validation dataset, as :class:`COCODetectionMetric` scores boxes.

    The predictions also carry ``masks`` ``[D, 1, H, W]``: mask probabilities (or binary masks) in input pixels, one
    per box (:class:`~mtvision.models.heads.MaskRCNNHead`'s ``predict``). Each is resized to the original image
    (bilinear, as the boxes are scaled), thresholded at 0.5 and RLE-encoded. The mask AP is evaluated without the
    boxes, so an instance's area (COCO's small / medium / large) is its mask's, as detectron2's COCO evaluator does;
    the box AP as :class:`COCODetectionMetric` computes it.
    """

    primary_key = 'mAP_segm'

    def __init__(self, dataset=None):
        super().__init__(dataset)  # no iou_type: both are evaluated

    def _to_coco_results(self, image_id: int, prediction: dict, target: dict) -> list[dict]:
        results = super()._to_coco_results(image_id, prediction, target)
        if 'masks' not in prediction:
            raise KeyError(f'prediction for image_id {image_id} has no masks (keys: {sorted(prediction)})')
        masks = prediction['masks'].detach()
        input_size = tuple(int(size) for size in target['input_size'])
        if masks.shape != (len(results), 1, *input_size):
            raise ValueError(f'prediction for image_id {image_id}: masks must be [D, 1, H, W] = '
                             f'{[len(results), 1, *input_size]} (one per box, at the input size), got '
                             f'{list(masks.shape)}')
        if not results:
            return results
        binary = resize_masks(masks, tuple(int(size) for size in target['orig_size']))[:, 0] > 0.5
        # pycocotools encodes column-major [H, W, D] uint8 arrays
        encoded = mask_utils.encode(np.asfortranarray(binary.permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
        for result, rle in zip(results, encoded):
            result['segmentation'] = rle
        return results

    def compute(self) -> dict[str, float]:
        results = self._all_results()
        boxes = [{key: value for key, value in result.items() if key != 'segmentation'} for result in results]
        # without a box, loadRes takes each result's area from its mask
        masks = [{key: value for key, value in result.items() if key != 'bbox'} for result in results]
        return {**self._evaluate(boxes, 'bbox'), **self._evaluate(masks, 'segm', _MASK_STAT_KEYS)}


def _first_ids(ids: list[int], shown: int = 5) -> str:
    listed = ', '.join(str(image_id) for image_id in ids[:shown])
    return listed + (f' and {len(ids) - shown} more' if len(ids) > shown else '')
