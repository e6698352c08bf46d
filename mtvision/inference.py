"""Predictions for images: each task's output in the frame of the original image (mmpretrain's
``inference_model``, with the inputs prepared as timm's ``resolve_data_config`` + eval transform would).

Each task's input is prepared as its ``model.data_config`` says (what :func:`mtvision.get_model` attaches):
classification with a ``crop_pct`` resizes the short side to ``input_size / crop_pct`` and centre-crops
(:class:`~mtvision.data.transforms.ResizeCenterCrop`, timm's eval geometry); whole-image task types (their spec's
``whole_image``: detection, segmentation, depth) resize the whole image to ``input_size`` with no crop, so that
every original pixel gets a prediction; a task whose data config gives no ``input_size`` (a ``MultiView``
pipeline) gets the backbone's own (``patch_size`` x ``grid_size``). Then ``(x / 255 - mean) / std``.

Tasks prepared alike share one backbone forward, unless the backbone routes per task (MoE: each task's forward runs
under its own routing) or the head needs a forward of its own (masked or momentum heads). Dense outputs are mapped
back as the evaluator scores them: the logits (log-depth for depth) resized bilinearly to the original size, then
the head's ``predict``; detection boxes are scaled by the original over the network size (each task type's spec
does its own: ``per_image_predictions``). Whole images only: a task's ``test_cfg`` sliding window is not applied
here.
"""
import functools
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from mtvision.data.datasets.imagefolder import read_image
from mtvision.data.prefetch import Normalization
from mtvision.data.transforms import Resize, ResizeCenterCrop
from mtvision.models.heads.protocols import MaskedImageHead, MomentumHead
from mtvision.task_types import registered_task_types, task_type_spec

__all__ = ['load_image', 'predict', 'predicted_task_types']


def predicted_task_types() -> tuple[str, ...]:
    """The task types :func:`predict` predicts when no task is named (their spec's ``predicted_by_default``)."""
    return tuple(name for name in registered_task_types() if task_type_spec(name).predicted_by_default)


@dataclass(frozen=True)
class Preprocessing:
    """How one task's inputs are made from a uint8 image; tasks with equal ones share a backbone forward."""
    size: tuple[int, int]
    interpolation: str
    crop_pct: float | None  # None: resize the whole image to ``size``
    normalization: Normalization

    @classmethod
    def of(cls, data_config: dict, task_type: str, backbone_size: tuple[int, int]) -> 'Preprocessing':
        size = data_config.get('input_size')
        # whole-image types are never cropped: every original pixel is predicted
        crop_pct = None if task_type_spec(task_type).whole_image else data_config.get('crop_pct')
        return cls(backbone_size if size is None else tuple(size[-2:]), data_config.get('interpolation') or 'bilinear',
                   crop_pct, Normalization(tuple(data_config['mean']), tuple(data_config['std'])))

    @functools.cached_property
    def geometry(self):
        """The resizing (and cropping) of a uint8 image ``[3, H, W]``."""
        if self.crop_pct is None:
            return Resize(self.size, interpolation=v2.InterpolationMode(self.interpolation), antialias=True)
        return ResizeCenterCrop(self.size[-1], self.crop_pct, self.interpolation)


def load_image(image, index: int = 0) -> Tensor:
    """``image`` as RGB uint8 ``[3, H, W]``: a file path (read by
    :func:`~mtvision.data.datasets.imagefolder.read_image`; a missing or unreadable file raises ``DataError`` naming
    it), a PIL image, or an RGB uint8 array ``[H, W, 3]`` (``[H, W]`` grayscale)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, index).as_subclass(Tensor)
    from PIL import Image
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert('RGB'))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and (
            image.ndim == 2 or image.ndim == 3 and image.shape[2] == 3):
        rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    found = f'{image.dtype} array of shape {image.shape}' if isinstance(image, np.ndarray) else type(image).__name__
    raise TypeError(f'image {index}: expected a file path, a PIL image or an RGB uint8 array [H, W, 3], got {found}')


def predict(model, images, tasks: str | Sequence[str] | None = None, *, batch_size: int = 8,
            device: torch.device | str | None = None) -> list[dict]:
    """Each task's predictions for each image, in the original image's frame.

    Args:
        model: a :class:`~mtvision.models.MultiTaskModel` with ``cfg`` and ``data_config`` (as
            :func:`mtvision.get_model` returns it). It runs in eval mode; its train/eval mode is restored after.
        images: a file path, a PIL image or an RGB uint8 array ``[H, W, 3]``, or a list of them.
        tasks: a task name or names; None: every task of the types :func:`predicted_task_types`.
        batch_size: images per forward.
        device: where to run; the model is moved there. None: the model's device.

    Returns:
        One ``{task: prediction}`` per image, tensors on the CPU:

        - classification: ``dict(class_id, class_name, score, topk=[(class_id, class_name, probability), ...])``,
          the 5 most probable classes or all when fewer; names from ``data_config[task]['classes']``
          (None without them);
        - detection: ``dict(boxes=[D, 4] XYXY in original pixels, scores=[D], labels=[D], label_names)``, the
          detections the head kept (its score threshold, NMS, at most its ``detections_per_img``) by decreasing
          score; ``label_names`` a list of ``D`` names, None without ``data_config[task]['classes']``;
        - segmentation: ``LongTensor[H0, W0]`` class ids (names: ``model.data_config[task]['classes']``);
        - depth: ``FloatTensor[H0, W0]`` metres;
        - any other type (mae, contrastive), only when named in ``tasks``: the head's ``predict`` output for the
          image as it is (its row; a contrastive head gets the image as each of its views and gives the first
          view's embedding), or what its task type's ``per_image_predictions`` makes of it.

    Raises:
        KeyError: a task the model does not have (the message lists its tasks).
        ValueError: ``tasks=None`` on a model with no task of the :func:`predicted_task_types`.
        DataError: a missing or unreadable image file, naming it.
    """
    if not hasattr(model, 'cfg') or not hasattr(model, 'data_config'):
        raise AttributeError('predict needs a model with cfg and data_config, as mtvision.get_model returns it')
    types = {name: model.cfg.tasks[name]['type'] for name in model.heads}
    specs = {name: task_type_spec(task_type, f'tasks.{name}.type') for name, task_type in types.items()}
    names = _chosen_tasks(types, specs, tasks)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    device = next(model.parameters()).device if device is None else torch.device(device)
    backbone_size = tuple(n * model.backbone.patch_size for n in model.backbone.grid_size)
    groups = defaultdict(list)  # tasks prepared alike (and sharing a backbone forward) -> their names
    for name in names:
        head = model.heads[name]
        alone = model.is_moe or isinstance(head, (MaskedImageHead, MomentumHead)) or \
            not specs[name].predicted_by_default
        preprocessing = Preprocessing.of(model.data_config[name], types[name], backbone_size)
        groups[preprocessing, name if alone else None].append(name)
    was_training = model.training
    model.to(device).eval()
    results = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = [load_image(image, start + i) for i, image in enumerate(images[start:start + batch_size])]
            chunk_results = [{} for _ in chunk]
            sizes = [tuple(image.shape[-2:]) for image in chunk]
            for (preprocessing, _), group in groups.items():
                batch = torch.stack([preprocessing.geometry(image) for image in chunk])
                batch = preprocessing.normalization(batch.to(device))
                for name, outputs in _forward(model, group, batch).items():
                    with torch.no_grad():  # outside inference mode: the returned tensors are ordinary ones
                        per_image = specs[name].per_image_predictions(
                            model.heads[name], outputs, sizes, preprocessing.size,
                            model.data_config[name].get('classes'))
                    for prediction, result in zip(per_image, chunk_results):
                        result[name] = prediction
            results.extend(chunk_results)
    finally:
        model.train(was_training)
    return results


def _chosen_tasks(types: dict[str, str], specs: dict, tasks) -> list[str]:
    if tasks is None:
        chosen = [name for name, spec in specs.items() if spec.predicted_by_default]
        if not chosen:
            raise ValueError(f'the model has no task of the types {predicted_task_types()} (its tasks and types: '
                             f"{types}); name a task in tasks= to get its head's predict output as it is")
        return chosen
    chosen = [tasks] if isinstance(tasks, str) else list(tasks)
    for name in chosen:
        if name not in types:
            raise KeyError(f'unknown task {name!r}; the model has the tasks {sorted(types)}')
    return list(dict.fromkeys(chosen))


@torch.inference_mode()
def _forward(model, names: list[str], images: Tensor) -> dict[str, object]:
    """Raw head outputs of the tasks ``names``: one backbone forward for all of them, or (one task) the model's own
    forward for that task (its routing, masking, momentum backbone)."""
    if len(names) == 1:
        views = getattr(model.heads[names[0]], 'num_views', 1)  # a contrastive head takes the image as each view
        return {names[0]: model(names[0], images.repeat(views, 1, 1, 1))}
    features = model.features(names[0], images)
    return {name: model.heads[name](features) for name in names}
