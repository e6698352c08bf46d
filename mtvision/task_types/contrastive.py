"""Contrastive self-supervised learning (SimCLR, MoCo v3): views of one image embed close together."""
from mtvision.data.collate import collate_views
from mtvision.registry import TASK_TYPES
from mtvision.task_types.base import TaskType


@TASK_TYPES.register_module(name='contrastive')
class ContrastiveTaskType(TaskType):
    display_name = 'Self-supervised Learning'
    collate = staticmethod(collate_views)
    grid_panels = 3

    def grid_rows(self, num_images: int) -> int:
        return num_images // 2  # view-major: the first half of the batch is view 1 of each image

    def draw_prediction_grid(self, figure, axes, pictures, targets, predictions, names, mean, std) -> None:
        from mtvision.visualization import draw_view_retrieval  # matplotlib only when drawing
        draw_view_retrieval(axes, pictures, predictions)
