"""Masked image modeling (MAE, SimMIM): the image is its own target."""
from mtvision.data.collate import collate_images
from mtvision.registry import TASK_TYPES
from mtvision.task_types.base import TaskType


@TASK_TYPES.register_module(name='mae')
class MaskedImageModelingTaskType(TaskType):
    display_name = 'Masked Image Modeling'
    collate = staticmethod(collate_images)
    grid_panels = 3

    def draw_prediction_grid(self, figure, axes, pictures, targets, predictions, names, mean, std) -> None:
        from mtvision.visualization import draw_reconstructions  # matplotlib only when drawing
        draw_reconstructions(axes, pictures, predictions, mean, std)
