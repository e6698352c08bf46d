"""Instance segmentation: boxes with class labels and a mask per object."""
import numpy as np

from mtvision.models.heads.mask_rcnn import resize_masks
from mtvision.registry import TASK_TYPES
from mtvision.task_types.detection import DetectionTaskType, _in_original_frame

MASK_ALPHA = 0.45  # opacity of a drawn mask over the image


@TASK_TYPES.register_module(name='instance_segmentation')
class InstanceSegmentationTaskType(DetectionTaskType):
    """Detection with a mask per object: its batches (``collate_detection`` keeps the targets' ``masks``), whole
    images at inference, two drawn panels, summaries, and no one-to-one comparison of predictions."""

    display_name = 'Instance Segmentation'

    def draw_prediction_row(self, figure, axes, picture, target, prediction, names) -> None:
        """Detection's two panels (true boxes, predicted boxes), each object's mask laid over its box."""
        from mtvision.visualization import (DETECTION_SCORE_THRESHOLD, MAX_DRAWN_BOXES, _as_numpy,
                                            draw_detection)  # matplotlib only when drawing
        draw_detection(axes, picture, target, prediction, names)
        scores = _as_numpy(prediction['scores']).reshape(-1)
        order = np.argsort(-scores, kind='stable')
        shown = order[scores[order] >= DETECTION_SCORE_THRESHOLD][:MAX_DRAWN_BOXES]  # the boxes drawn
        if 'masks' in target:
            _overlay_masks(axes[0], _as_numpy(target['masks']) > 0, _as_numpy(target['labels']).reshape(-1))
        masks = _as_numpy(prediction['masks'])
        _overlay_masks(axes[1], masks.reshape(-1, *masks.shape[-2:])[shown] > 0.5,
                       _as_numpy(prediction['labels']).reshape(-1)[shown])

    def per_image_predictions(self, head, outputs, sizes, input_size, classes) -> list:
        """Detection's ``dict(boxes, scores, labels, label_names)`` in the original image's frame with ``masks``
        ``[D, H0, W0]`` (bool): each detection's mask resized to the original size and thresholded at 0.5."""
        predictions = []
        for prediction, size in zip(head.predict(outputs), sizes):
            in_frame = _in_original_frame(prediction, size, input_size, classes)
            in_frame['masks'] = (resize_masks(prediction['masks'], size)[:, 0] > 0.5).cpu()
            predictions.append(in_frame)
        return predictions

    def to_json(self, prediction, classes, stem):
        """Detection's lists, the masks in ``<stem>-masks.npy`` (bool ``[D, H0, W0]``)."""
        masks_file = stem.parent / f'{stem.name}-masks.npy'
        np.save(masks_file, prediction['masks'].numpy())
        boxes_only = {key: value for key, value in prediction.items() if key != 'masks'}
        return dict(super().to_json(boxes_only, classes, stem), masks=masks_file.name)


def _overlay_masks(ax, masks: np.ndarray, labels: np.ndarray) -> None:
    """Colour each mask of ``masks`` ``[N, H, W]`` (bool) by its label over what ``ax`` shows."""
    from mtvision.visualization import _PALETTE
    if not len(masks):
        return
    overlay = np.zeros((*masks.shape[-2:], 4))
    for mask, label in zip(masks, labels.tolist()):
        overlay[mask] = (*_PALETTE[label % len(_PALETTE)], MASK_ALPHA)
    ax.imshow(overlay, interpolation='nearest')
