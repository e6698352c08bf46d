"""Surface normal estimation: a unit normal per pixel."""
from mtvision.data.collate import collate_normals
from mtvision.registry import TASK_TYPES
from mtvision.task_types.base import DenseTaskType

CHANGED_ANGLE_COSINE = 0.9998  # cos(~1.1 degrees): a pixel's normal turned further counts as a changed prediction


@TASK_TYPES.register_module(name='normals')
class SurfaceNormalsTaskType(DenseTaskType):
    display_name = 'Surface Normal Estimation'
    collate = staticmethod(collate_normals)
    grid_panels = 3

    @staticmethod
    def predictions_differ(before, after):
        return (before * after).sum(dim=1) < CHANGED_ANGLE_COSINE

    def draw_prediction_row(self, figure, axes, picture, target, prediction, names) -> None:
        from mtvision.visualization import draw_normals  # matplotlib only when drawing
        draw_normals(axes, picture, target, prediction)
