"""The spec of a task type: everything the framework does differently for one kind of task.

A config names a task's type with ``tasks.<name>.type``; the name is looked up in :data:`~mtvision.registry.TASK_TYPES`,
where each type registers a :class:`TaskType` subclass under that name (one file per type in this package). The
trainer, evaluator, visualisation, inference, extraction and model cards ask the spec (:func:`task_type_spec`)
instead of testing names, so a new type is one registered class (plus its head, dataset and metric) and no edit
elsewhere.
"""
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from mtvision.registry import TASK_TYPES

__all__ = ['DenseTaskType', 'TaskType', 'class_name', 'registered_task_types', 'resize_to', 'task_type_spec',
           'write_png']


class TaskType:
    """What the framework needs to know of one task type. Subclass it, set the class attributes, override the
    methods that differ, and register it under the config's name::

        @TASK_TYPES.register_module(name='depth')
        class DepthTaskType(DenseTaskType):
            display_name = 'Depth Estimation'
            collate = staticmethod(collate_depth)
            ...

    The targets and predictions below are in the formats of docs/ARCHITECTURE.md (the type's collate function and
    head's ``predict``).
    """

    display_name: str  # in model cards (tools/publish_model.py), e.g. 'Image Classification'
    collate: Callable[[Sequence], dict]  # a list of (image, target) samples -> dict(images=..., targets=...)
    # per-pixel outputs: scored at the stored target's original size, may be slide-inferred
    # (tasks.<name>.test_cfg.mode='slide'), predicted for the whole image (never centre-cropped) at inference
    dense: bool = False
    # never centre-cropped at inference, so every original pixel is predicted (dense types, and e.g. detection)
    whole_image: bool = False
    # mtvision.predict(model, images) with no tasks= predicts it (mapped to the original image's frame)
    predicted_by_default: bool = False
    grid_panels: int  # panels per sample in a prediction grid (mtvision.visualization.save_prediction_grid)
    # before, after -> bool tensor of the predictions that differ (tools/extract_task_model.py); None: outputs
    # with no one-to-one comparison (boxes, reconstructions, embeddings)
    predictions_differ: Callable[[Tensor, Tensor], Tensor] | None = None

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.name!r})'

    def check_datasets(self, train_dataset, val_dataset, where: str) -> None:
        """Raise ValueError naming ``where`` (``'tasks.<name>'``) when the task's datasets do not fit together;
        either may be None (not built)."""

    def grid_rows(self, num_images: int) -> int:
        """The samples a prediction grid can draw from a batch of ``num_images`` network inputs."""
        return num_images

    def draw_prediction_grid(self, figure, axes, pictures, targets, predictions, names, mean, std) -> None:
        """Draw the first ``len(axes)`` samples of a batch, one row of ``grid_panels`` axes each.

        Args:
            figure: the matplotlib figure (for colour bars).
            axes: ``[rows, grid_panels]`` matplotlib axes, turned off.
            pictures: the batch inputs as uint8 RGB images ``[B, H, W, 3]``.
            targets, predictions: the batch targets and the head's predictions.
            names: ``names(label)``, a class id's name.
            mean, std: the normalisation of the network inputs (to show image-like predictions).
        """
        for row, row_axes in enumerate(axes):
            self.draw_prediction_row(figure, row_axes, pictures[row], targets[row], predictions[row], names)

    def draw_prediction_row(self, figure, axes, picture, target, prediction, names) -> None:
        """Draw one sample on ``axes`` (``grid_panels`` of them): what :meth:`draw_prediction_grid` does per row."""
        raise NotImplementedError(f'task type {self.name!r} does not draw its predictions')

    def per_image_predictions(self, head, outputs, sizes: list[tuple[int, int]], input_size: tuple[int, int],
                              classes: Sequence[str] | None) -> list:
        """One prediction per image from the head's raw ``outputs`` for a batch (mtvision.predict).

        Args:
            head: the task's head (its ``predict`` turns outputs into predictions).
            outputs: the head's forward output for the batch.
            sizes: each image's original ``(height, width)``.
            input_size: the ``(height, width)`` the images were resized to for the network.
            classes: the class names of ``data_config[task]['classes']``, or None.

        Returns the head's ``predict`` output, one image's row each (nothing mapped back): types with
        ``predicted_by_default`` map theirs to the original image's frame.
        """
        predictions = head.predict(outputs)
        return [_row(predictions, i) for i in range(len(sizes))]

    def summarize(self, prediction, classes: Sequence[str] | None, score_thr: float = 0.3) -> str:
        """A short line on one image's prediction (``per_image_predictions``' format) for ``tools/predict.py``;
        ``score_thr``: the score from which detections count."""
        return f'{self.name} output'

    def to_json(self, prediction, classes: Sequence[str] | None, stem: Path):
        """One image's prediction as JSON data for ``tools/predict.py --out``; maps and other tensors go to files
        named ``<stem>.png`` or ``<stem>-<key>.npy`` beside it (the data names them)."""
        items = prediction.items() if isinstance(prediction, dict) else [('output', prediction)]
        files = {}
        for key, value in items:
            path = stem.parent / f'{stem.name}-{key}.npy'
            np.save(path, np.asarray(value))
            files[key] = path.name
        return files


class DenseTaskType(TaskType):
    """A type whose outputs are maps over the image: resized to the original size for scoring and inference."""

    dense = True
    whole_image = True
    predicted_by_default = True

    def predict_at_size(self, head, output: Tensor, size: tuple[int, int]) -> Tensor:
        """The head's prediction for one image's raw ``output`` ``[C, h, w]`` at ``size``: the output resized
        (:func:`resize_to`) before ``predict``, as mmseg scores at the original size; ``[1, ..., *size]``."""
        return head.predict(resize_to(output, size))

    def per_image_predictions(self, head, outputs, sizes, input_size, classes) -> list:
        """Each image's prediction at its original size ``[..., H0, W0]``, a single-channel map as ``[H0, W0]``."""
        return [self.predict_at_size(head, output, size).reshape(-1, *size).squeeze(0).cpu()
                for output, size in zip(outputs, sizes)]


def class_name(class_id: int, classes: Sequence[str] | None) -> str:
    return classes[class_id] if classes is not None else f'class {class_id}'


def write_png(path: Path, array: np.ndarray) -> str:
    """Write ``array`` as a PNG (uint8 or uint16, one or three channels); returns the file's name."""
    import cv2
    if not cv2.imwrite(str(path), array):
        raise OSError(f'cannot write {path}')
    return path.name


def resize_to(outputs: Tensor, size: tuple[int, int]) -> Tensor:
    """One image's raw outputs ``[C, h, w]`` resized to ``size`` as mmseg's ``resize`` of the logits in
    ``postprocess_result``: bilinear, ``align_corners=False``, float32; ``[1, C, *size]``."""
    return F.interpolate(outputs[None].float(), size=tuple(size), mode='bilinear', align_corners=False)


def _row(predictions, i: int):
    if isinstance(predictions, dict):
        return {key: _row(value, i) for key, value in predictions.items()}
    return predictions[i].cpu() if isinstance(predictions, Tensor) else predictions[i]


def registered_task_types() -> tuple[str, ...]:
    """The names of every registered task type, in registration order (the built-in ones first)."""
    TASK_TYPES.import_from_location()
    return tuple(TASK_TYPES.module_dict)


def task_type_spec(name: str, where: str = 'task type') -> TaskType:
    """The spec of the task type ``name``; ``where`` names it in the error, e.g. ``'tasks.cls.type'``.

    Raises:
        ValueError: an unregistered name, listing the registered ones.
    """
    registered = registered_task_types()
    # module_dict, not TASK_TYPES.get: get would import a dotted name
    if not isinstance(name, str) or name not in registered:
        raise ValueError(f'{where}={name!r} is not a registered task type; registered: {registered} (register a '
                         f'TaskType subclass in mtvision.registry.TASK_TYPES to add one)')
    return TASK_TYPES.module_dict[name](name)
