"""Multi-label classification: every class present in the image."""
from mtvision.data.collate import collate_multilabel
from mtvision.data.datasets.imagefolder import check_class_order
from mtvision.registry import TASK_TYPES
from mtvision.task_types.base import TaskType, class_name

PRESENT = 0.5  # probability from which a class counts as predicted present


@TASK_TYPES.register_module(name='multilabel')
class MultiLabelTaskType(TaskType):
    display_name = 'Multi-label Classification'
    collate = staticmethod(collate_multilabel)
    predicted_by_default = True
    grid_panels = 1

    @staticmethod
    def predictions_differ(before, after):
        return (before >= PRESENT) != (after >= PRESENT)

    def check_datasets(self, train_dataset, val_dataset, where: str) -> None:
        if train_dataset is not None and val_dataset is not None:
            check_class_order(train_dataset, val_dataset, where)

    def draw_prediction_row(self, figure, axes, picture, target, prediction, names) -> None:
        from mtvision.visualization import draw_multilabel  # matplotlib only when drawing
        draw_multilabel(axes, picture, target, prediction, names, PRESENT)

    def per_image_predictions(self, head, outputs, sizes, input_size, classes) -> list:
        """``dict(class_ids, class_names, scores)`` per image: the classes predicted present (probability at least
        ``PRESENT``) by decreasing probability, and ``probabilities`` of every class."""
        predictions = []
        for probabilities in head.predict(outputs).cpu():
            scores, ids = probabilities.sort(descending=True)
            kept = scores >= PRESENT
            class_ids = ids[kept].tolist()
            predictions.append(dict(class_ids=class_ids, scores=scores[kept].tolist(), probabilities=probabilities,
                                    class_names=None if classes is None else [classes[i] for i in class_ids]))
        return predictions

    def summarize(self, prediction, classes, score_thr: float = 0.3) -> str:
        present = [f'{class_name(i, classes)} ({score:.2f})' for i, score in zip(prediction['class_ids'],
                                                                                 prediction['scores'])]
        return ', '.join(present) if present else 'no class present'

    def to_json(self, prediction, classes, stem):
        return dict(prediction, probabilities=prediction['probabilities'].tolist())
