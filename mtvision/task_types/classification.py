"""Image classification: one class per image."""
from torch import Tensor

from mtvision.data.collate import collate_classification
from mtvision.data.datasets.imagefolder import check_class_order
from mtvision.registry import TASK_TYPES
from mtvision.task_types.base import TaskType, class_name

TOP_K = 5  # classes each inference result lists


@TASK_TYPES.register_module(name='classification')
class ClassificationTaskType(TaskType):
    display_name = 'Image Classification'
    collate = staticmethod(collate_classification)
    predicted_by_default = True
    grid_panels = 1

    @staticmethod
    def predictions_differ(before: Tensor, after: Tensor) -> Tensor:
        return before.argmax(dim=1) != after.argmax(dim=1)

    def check_datasets(self, train_dataset, val_dataset, where: str) -> None:
        if train_dataset is not None and val_dataset is not None:
            check_class_order(train_dataset, val_dataset, where)

    def draw_prediction_row(self, figure, axes, picture, target, prediction, names) -> None:
        from mtvision.visualization import draw_classification  # matplotlib only when drawing
        draw_classification(axes, picture, target, prediction, names)

    def per_image_predictions(self, head, outputs, sizes, input_size, classes) -> list:
        """``dict(class_id, class_name, score, topk=[(class_id, class_name, probability), ...])`` per image, the
        ``TOP_K`` most probable classes (all when fewer)."""
        return [_top_classes(probabilities.cpu(), classes) for probabilities in head.predict(outputs)]

    def summarize(self, prediction, classes, score_thr: float = 0.3) -> str:
        return f'{class_name(prediction["class_id"], classes)} ({prediction["score"]:.3f})'

    def to_json(self, prediction, classes, stem):
        return prediction


def _top_classes(probabilities: Tensor, classes) -> dict:
    scores, ids = probabilities.topk(min(TOP_K, probabilities.numel()))
    topk = [(i, None if classes is None else classes[i], s) for s, i in zip(scores.tolist(), ids.tolist())]
    return dict(class_id=topk[0][0], class_name=topk[0][1], score=topk[0][2], topk=topk)
