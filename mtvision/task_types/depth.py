"""Monocular depth estimation: metres per pixel."""
from mtvision.data.collate import collate_depth
from mtvision.registry import TASK_TYPES
from mtvision.task_types.base import DenseTaskType

CHANGED_DEPTH = 0.01  # relative change of a pixel's depth that extraction counts as a changed prediction


@TASK_TYPES.register_module(name='depth')
class DepthTaskType(DenseTaskType):
    display_name = 'Depth Estimation'
    collate = staticmethod(collate_depth)
    grid_panels = 3

    @staticmethod
    def predictions_differ(before, after):
        return (before - after).abs() > CHANGED_DEPTH * before.abs()

    def draw_prediction_row(self, figure, axes, picture, target, prediction, names) -> None:
        from mtvision.visualization import draw_depth  # matplotlib only when drawing
        draw_depth(figure, axes, picture, target, prediction)
