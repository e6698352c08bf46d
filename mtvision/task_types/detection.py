"""Object detection: boxes with class labels."""
from mtvision.data.collate import collate_detection
from mtvision.registry import TASK_TYPES
from mtvision.task_types.base import TaskType, class_name

BEST_DETECTIONS = 3  # detections a summary line shows


@TASK_TYPES.register_module(name='detection')
class DetectionTaskType(TaskType):
    display_name = 'Object Detection'
    collate = staticmethod(collate_detection)
    whole_image = True
    predicted_by_default = True
    grid_panels = 2

    def draw_prediction_row(self, figure, axes, picture, target, prediction, names) -> None:
        from mtvision.visualization import draw_detection  # matplotlib only when drawing
        draw_detection(axes, picture, target, prediction, names)

    def per_image_predictions(self, head, outputs, sizes, input_size, classes) -> list:
        """``dict(boxes=[D, 4] XYXY in original pixels, scores=[D], labels=[D], label_names)`` per image: the
        head's detections, the boxes scaled by the original over the network size."""
        return [_in_original_frame(prediction, size, input_size, classes)
                for prediction, size in zip(head.predict(outputs), sizes)]

    def summarize(self, prediction, classes, score_thr: float = 0.3) -> str:
        """The number of detections scoring at least ``score_thr`` and the best few."""
        kept = (prediction['scores'] >= score_thr).nonzero().flatten().tolist()  # the head sorts by score
        best = ', '.join(f'{class_name(int(prediction["labels"][i]), classes)} {float(prediction["scores"][i]):.2f} '
                         f'[{", ".join(f"{v:.0f}" for v in prediction["boxes"][i].tolist())}]'
                         for i in kept[:BEST_DETECTIONS])
        return f'{len(kept)} detections with score >= {score_thr:g}' + (f'; best: {best}' if best else '')

    def to_json(self, prediction, classes, stem):
        return {key: value.tolist() if hasattr(value, 'tolist') else value for key, value in prediction.items()}


def _in_original_frame(prediction: dict, size: tuple[int, int], input_size: tuple[int, int], classes) -> dict:
    (height, width), (input_height, input_width) = size, input_size
    scale = prediction['boxes'].new_tensor([width / input_width, height / input_height] * 2)
    labels = prediction['labels'].cpu()
    return dict(boxes=(prediction['boxes'].float() * scale).cpu(), scores=prediction['scores'].float().cpu(),
                labels=labels, label_names=None if classes is None else [classes[label] for label in labels.tolist()])
