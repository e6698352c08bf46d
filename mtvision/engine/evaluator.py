"""Evaluation: each task's head on its validation set, scored by its metric.

Dense tasks (their task type's spec says ``dense``: segmentation, depth) follow mmsegmentation's protocol: the
metric sees the ground truth as stored, never the pipeline's resized copy. When the validation dataset has
``original_target(index)`` (the target of sample ``index`` at its original size, in the training target's units),
each image's raw head output is resized bilinearly (``align_corners=False``) to that size and only then turned into
a prediction by the head's ``predict`` (the spec's ``predict_at_size``), as mmseg's
``BaseSegmentor.postprocess_result`` resizes the logits to ``ori_shape`` before ``IoUMetric`` accumulates
intersection and union (depth heads output log-depth, so depth is resized in log space). The head output itself
comes from the whole input image (mmseg's ``mode='whole'``) or from overlapping crops (``mode='slide'``,
:func:`slide_inference`). A task sets this with ``test_cfg``, e.g.
``tasks.seg.test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341))``; ``original_size=False`` scores
the pipeline's targets instead.
"""
import copy
import functools
import itertools
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from mtvision.data.collate import collate_fn_for
from mtvision.data.loader import build_loader
from mtvision.data.prefetch import DevicePrefetcher
from mtvision.distributed import all_gather_objects, rank_and_world
from mtvision.engine.logging import text_table
from mtvision.models.multitask import MultiTaskModel
from mtvision.registry import METRICS
from mtvision.task_types import registered_task_types, task_type_spec
from mtvision.tasks import Task

logger = logging.getLogger(__name__)


def build_metric(task: Task):
    try:
        return METRICS.build(task.metric, default_args=dict(dataset=task.val_dataset))
    except TypeError as error:
        raise TypeError(f'tasks.{task.name}.metric: {error}') from error


TEST_MODES = ('whole', 'slide')


@dataclass(frozen=True)
class InferenceCfg:
    """How a task's validation images are run and scored (``tasks.<name>.test_cfg``).

    Args:
        mode: ``'whole'``: the head sees each input image at once; ``'slide'``: overlapping crops of
            ``crop_size`` every ``stride`` pixels (:func:`slide_inference`; dense tasks only).
        crop_size, stride: ``(height, width)`` of the slide windows and of their steps.
        original_size: score dense tasks against the dataset's ``original_target`` when it has one (mmseg's
            protocol); False scores the pipeline's (resized) targets.
    """
    mode: str = 'whole'
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    original_size: bool = True


def _pair(value, where: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f'{where} must be a positive int or a (height, width) pair of them, got {value!r}')
    return pair


def inference_cfg(task: Task) -> InferenceCfg:
    """The task's ``test_cfg``, checked; errors name the key, e.g. ``tasks.seg.test_cfg.stride``."""
    cfg = dict(task.test_cfg or {})
    where = f'tasks.{task.name}.test_cfg'
    unknown = set(cfg) - set(InferenceCfg.__dataclass_fields__)
    if unknown:
        raise ValueError(f'unknown key {where}.{sorted(unknown)[0]!r}; known keys: '
                         f'{sorted(InferenceCfg.__dataclass_fields__)}')
    mode = cfg.get('mode', 'whole')
    if mode not in TEST_MODES:
        raise ValueError(f'{where}.mode must be one of {TEST_MODES}, got {mode!r}')
    if not isinstance(cfg.get('original_size', True), bool):
        raise ValueError(f'{where}.original_size must be True or False, got {cfg["original_size"]!r}')
    if mode == 'whole':
        if 'crop_size' in cfg or 'stride' in cfg:
            raise ValueError(f"{where}: crop_size and stride are for mode='slide', got mode='whole'")
        return InferenceCfg(original_size=cfg.get('original_size', True))
    if not task_type_spec(task.type).dense:
        dense_types = tuple(name for name in registered_task_types() if task_type_spec(name).dense)
        raise ValueError(f"{where}.mode='slide' is for the dense task types {dense_types}, not {task.type!r}")
    for key in ('crop_size', 'stride'):
        if key not in cfg:
            raise ValueError(f"{where}.mode='slide' needs {key}, e.g. crop_size=(512, 512), stride=(341, 341)")
    return InferenceCfg(mode, _pair(cfg['crop_size'], f'{where}.crop_size'), _pair(cfg['stride'], f'{where}.stride'),
                        cfg.get('original_size', True))


def slide_windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the windows along one axis of ``size`` pixels, as mmseg's ``slide_inference``: one every
    ``stride`` pixels, as many as it takes to reach the end, the last shifted back to end at the border (a window
    is the whole axis when ``size <= crop``)."""
    steps = max(size - crop + stride - 1, 0) // stride + 1
    windows = []
    for step in range(steps):
        end = min(step * stride + crop, size)
        windows.append((max(end - crop, 0), end))
    return windows


def slide_inference(forward: Callable[[Tensor], Tensor], images: Tensor, crop_size: tuple[int, int],
                    stride: tuple[int, int]) -> Tensor:
    """Dense outputs ``[B, C, H, W]`` of ``images`` ``[B, 3, H, W]`` from overlapping crops.

    mmsegmentation's ``EncoderDecoder.slide_inference`` (mmseg/models/segmentors/encoder_decoder.py), used by its
    ADE20K 512x512 recipes with ``crop_size=(512, 512), stride=(341, 341)``: ``forward`` (the head's raw outputs
    at its input's size) runs on each window of :func:`slide_windows` along both axes, and every pixel gets the
    sum of the outputs of the windows covering it divided by their number (logits; log-depth for depth heads).
    Accumulated in float32.
    """
    height, width = images.shape[-2:]
    summed, count = None, images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for (top, bottom), (left, right) in itertools.product(slide_windows(height, crop_size[0], stride[0]),
                                                          slide_windows(width, crop_size[1], stride[1])):
        outputs = forward(images[:, :, top:bottom, left:right])
        if outputs.shape[-2:] != (bottom - top, right - left):
            raise ValueError(f'slide inference needs outputs at the size of their crop, got '
                             f'{tuple(outputs.shape[-2:])} for a {bottom - top}x{right - left} crop')
        if summed is None:
            summed = images.new_zeros((*outputs.shape[:2], height, width), dtype=torch.float32)
        summed[:, :, top:bottom, left:right] += outputs.float()
        count[:, :, top:bottom, left:right] += 1
    return summed / count


def infer(model: MultiTaskModel, task: str, images: Tensor, cfg: InferenceCfg = InferenceCfg()) -> Tensor:
    """The raw outputs of ``task``'s head on ``images``: of the whole images, or slid over them."""
    if cfg.mode == 'slide':
        return slide_inference(functools.partial(model, task), images, cfg.crop_size, cfg.stride)
    return model(task, images)


def shard_indices(num_samples: int, shard: bool = True) -> range:
    """The validation indices this rank evaluates: under torch.distributed with ``shard``, samples rank,
    rank + world, ...; every index otherwise."""
    rank, world = rank_and_world() if shard else (0, 1)
    return range(rank, num_samples, world)


class _IndexedSamples(Dataset):
    """The samples ``indices`` of ``dataset``, each with its index and, with ``original_targets``, the dataset's
    ``original_target(index)`` (read in the loader's workers, like the samples)."""

    def __init__(self, dataset, indices: Sequence[int], original_targets: bool):
        self.dataset, self.indices, self.original_targets = dataset, indices, original_targets

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        original = self.dataset.original_target(index) if self.original_targets else None
        return self.dataset[index], index, original


def _collate_indexed(collate: Callable, items: list) -> dict:
    batch = collate([sample for sample, _, _ in items])
    batch['indices'] = [index for _, index, _ in items]
    if items[0][2] is not None:
        batch['original_targets'] = [original for _, _, original in items]
    return batch


# DataLoaders kept between evaluations, so that their (persistent) workers are started once per run; an entry goes
# when its validation dataset is garbage collected (the loader holds a copy of the dataset, never the dataset)
_VAL_LOADERS: dict[tuple, tuple] = {}


def val_loader(task: Task, shard: bool = True, original_targets: bool = False,
               device: torch.device | str = 'cpu') -> DevicePrefetcher:
    """The task's validation set in order, as batches on ``device`` (images float and normalised); under
    torch.distributed with ``shard``, this rank's shard (samples rank, rank + world, ...), which ``evaluate`` merges
    back. Each batch also holds ``indices``, the dataset index of each row, and with ``original_targets`` the list of
    the dataset's ``original_target`` of each row.

    Workers send uint8 images, normalised on ``device`` (:mod:`mtvision.data.prefetch`); with ``num_workers > 0``
    the loader and its workers are kept for the next evaluation of the same dataset.
    """
    device = torch.device(device)
    dataset = task.val_dataset
    key = (id(dataset), shard and rank_and_world(), original_targets, task.val_batch_size, task.num_workers,
           device.type)
    cached = _VAL_LOADERS.get(key)
    if cached is None:
        indexed = _IndexedSamples(copy.copy(dataset), shard_indices(len(dataset), shard), original_targets)
        collate = functools.partial(_collate_indexed, collate_fn_for(task, 'val'))
        cached = build_loader(indexed, device, batch_size=task.val_batch_size, num_workers=task.num_workers,
                              shuffle=False, collate_fn=collate)
        if task.num_workers > 0:
            _VAL_LOADERS[key] = cached
            weakref.finalize(dataset, _VAL_LOADERS.pop, key, None)
    loader, normalization = cached
    return DevicePrefetcher(loader, device, normalization, with_host=False)


def scores_original_size(task: Task, cfg: InferenceCfg) -> bool:
    """Whether ``task`` is scored against its dataset's ``original_target`` (see the module docstring)."""
    return (cfg.original_size and task_type_spec(task.type).dense
            and callable(getattr(task.val_dataset, 'original_target', None)))


@torch.no_grad()
def evaluate(model: MultiTaskModel, tasks: Mapping[str, Task], picture_dir: Path | None = None,
             step: int | None = None, autocast: dict | None = None, shard: bool = True) -> dict[str, dict[str, float]]:
    """Metrics of every task that has a validation set; with ``picture_dir``, a PNG of sample predictions each.

    Under torch.distributed every rank evaluates its shard and the metrics are merged, so every rank returns the
    metrics of the whole validation set (batch-dependent metrics such as view retrieval see the shards' batches).
    Dense tasks are scored at the ground truth's original size when their dataset provides it (module docstring).
    """
    device = next(model.parameters()).device
    cfgs = {name: inference_cfg(task) for name, task in tasks.items()}  # every test_cfg checked before a forward
    # evaluation draws random numbers (MAE's masks): a private, fixed stream makes every evaluation see the same
    # masks and leaves the training stream, and so the training run, unchanged by how often it is evaluated
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(0)
        return _evaluate(model, tasks, cfgs, device, picture_dir, step, autocast, shard)


def _evaluate(model, tasks, cfgs, device, picture_dir, step, autocast, shard) -> dict[str, dict[str, float]]:
    autocast = autocast or dict(device_type=device.type, enabled=False)
    was_training = model.training
    model.eval()
    results = {}
    for task in tasks.values():
        if task.val_dataset is None:
            continue
        cfg = cfgs[task.name]
        original_size = scores_original_size(task, cfg)
        spec = task_type_spec(task.type)
        head = model.heads[task.name]
        metric = build_metric(task)
        # a bar on rank 0 only (where TQDM_DISABLE=1 also hides it); closed by `with` also when a batch raises,
        # so the error's message is not followed by a redrawn bar
        loader = val_loader(task, shard, original_targets=original_size, device=device)
        bar_args = {} if rank_and_world()[0] == 0 else {'disable': True}
        with tqdm(loader, desc=f'val {task.name}', unit='batch', leave=False, dynamic_ncols=True, **bar_args) as bar:
            for i, batch in enumerate(bar):
                with torch.autocast(**autocast):
                    outputs = infer(model, task.name, batch['images'], cfg)
                    drawing = i == 0 and picture_dir is not None
                    # at the input size: what the metric scores, unless it scores the original size (then only drawn)
                    predictions = head.predict(outputs) if drawing or not original_size else None
                if original_size:
                    for output, target in zip(outputs, batch['original_targets']):
                        metric.update(spec.predict_at_size(head, output, target.shape[-2:]), target[None])
                else:
                    metric.update(predictions, batch['targets'])
                if drawing:
                    from mtvision.visualization import save_prediction_grid  # matplotlib only when drawing
                    suffix = f'_iter_{step}' if step is not None else ''
                    save_prediction_grid(picture_dir / f'{task.name}{suffix}.png', task.type, batch['images'],
                                         batch['targets'], predictions, task.mean, task.std, task.class_names)
        if shard and rank_and_world()[1] > 1:
            metric.merge(all_gather_objects(metric.state()))
        results[task.name] = metric.compute()
    model.train(was_training)
    return results


# metrics in percent (accuracies, COCO AP, IoU) and in metres (depth errors); the others are ratios or unitless
PERCENT_METRICS = ('top', 'mAP', 'mIoU', 'mAcc', 'aAcc', 'within_', 'precision_', 'recall_', 'f1_')
METRE_METRICS = ('rmse', 'sq_rel')
DEGREE_METRICS = ('mean', 'median')  # the normals' angular errors


def metric_unit(name: str) -> str:
    """The unit of a metric of mtvision's metrics, by name: ``'%'``, ``'m'``, ``'deg'`` or ``''``."""
    if name.startswith(PERCENT_METRICS):
        return '%'
    return 'm' if name in METRE_METRICS else 'deg' if name in DEGREE_METRICS else ''


def metrics_table(results: Mapping[str, Mapping[str, float]],
                  baseline: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """A plain-text table, one row per task and metric with its unit; with ``baseline``, its values beside the
    results."""
    rows = [('task', 'metric', 'unit', 'untrained', 'value') if baseline else ('task', 'metric', 'unit', 'value')]
    for task, values in results.items():
        for key, value in values.items():
            row = (task, key, metric_unit(key))
            if baseline:
                row += (f'{baseline[task][key]:.4g}' if key in baseline.get(task, {}) else '',)
            rows.append((*row, f'{value:.4g}'))
    return text_table(rows)
