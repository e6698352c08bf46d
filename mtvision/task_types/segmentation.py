"""Semantic segmentation: a class id per pixel."""
from mtvision.data.collate import collate_segmentation
from mtvision.registry import TASK_TYPES
from mtvision.task_types.base import DenseTaskType


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
