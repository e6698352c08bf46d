"""Surface normal estimation: a unit normal per pixel."""
from mtvision.data.collate import collate_normals
from mtvision.registry import TASK_TYPES
from mtvision.data.surface_normals import encode_normals
from mtvision.task_types.base import DenseTaskType, write_png

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

    def summarize(self, prediction, classes, score_thr: float = 0.3) -> str:
        facing = -prediction[2]  # the camera looks along +z: a surface facing it has a normal with z < 0
        return f'{100 * float((facing > 0.9).float().mean()):.1f}% of the pixels face the camera (within 26 degrees)'

    def to_json(self, prediction, classes, stem):
        """An RGB PNG of the normals in the datasets' encoding (``rgb = (n + 1) / 2 * 255``)."""
        import cv2
        rgb = encode_normals(prediction.permute(1, 2, 0).numpy())
        return dict(normals_png=write_png(stem.with_suffix('.png'), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
