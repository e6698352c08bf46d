"""Semantic segmentation: a class id per pixel."""
from mtvision.data.collate import collate_segmentation
from mtvision.registry import TASK_TYPES
import numpy as np

from mtvision.task_types.base import DenseTaskType, class_name, write_png


@TASK_TYPES.register_module(name='segmentation')
class SegmentationTaskType(DenseTaskType):
    display_name = 'Semantic Segmentation'
    collate = staticmethod(collate_segmentation)
    grid_panels = 3

    @staticmethod
    def predictions_differ(before, after):
        return before != after

    def draw_prediction_row(self, figure, axes, picture, target, prediction, names) -> None:
        from mtvision.visualization import draw_segmentation  # matplotlib only when drawing
        draw_segmentation(axes, picture, target, prediction, names)

    def summarize(self, prediction, classes, score_thr: float = 0.3) -> str:
        """The classes present, by their share of the pixels."""
        ids, counts = prediction.unique(return_counts=True)
        shares = sorted(zip(counts.tolist(), ids.tolist()), reverse=True)
        return ', '.join(f'{class_name(i, classes)} {100 * c / prediction.numel():.1f}%' for c, i in shares)

    def to_json(self, prediction, classes, stem):
        """A PNG of class ids (8-bit, 16-bit past 255 classes)."""
        ids = prediction.numpy()
        dtype = np.uint8 if ids.max(initial=0) < 256 else np.uint16
        return dict(mask=write_png(stem.with_suffix('.png'), ids.astype(dtype)), classes=classes)
