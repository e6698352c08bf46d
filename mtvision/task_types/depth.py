"""Monocular depth estimation: metres per pixel."""
import numpy as np

from mtvision.data.collate import collate_depth
from mtvision.registry import TASK_TYPES
from mtvision.task_types.base import DenseTaskType, write_png

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

    def summarize(self, prediction, classes, score_thr: float = 0.3) -> str:
        return f'min {prediction.min():.2f} m, median {prediction.median():.2f} m, max {prediction.max():.2f} m'

    def to_json(self, prediction, classes, stem):
        """A 16-bit PNG of millimetres (NYUv2's format; 0 = no depth)."""
        millimetres = np.clip(np.rint(prediction.numpy() * 1000), 0, np.iinfo(np.uint16).max).astype(np.uint16)
        return dict(depth_png=write_png(stem.with_suffix('.png'), millimetres), depth_scale=1000)
