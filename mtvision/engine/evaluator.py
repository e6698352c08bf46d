"""Evaluation: each task's head on its validation set, scored by its metric."""
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from mtvision.data.collate import collate_fn_for
from mtvision.distributed import all_gather_objects, rank_and_world
from mtvision.models.multitask import MultiTaskModel
from mtvision.registry import METRICS
from mtvision.tasks import Task

logger = logging.getLogger(__name__)


def move_to(obj, device: torch.device):
    """Tensors inside nested dicts, lists and tuples moved to ``device`` (detection targets are lists of dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def build_metric(task: Task):
    try:
        return METRICS.build(task.metric, default_args=dict(dataset=task.val_dataset))
    except TypeError as error:
        raise TypeError(f'tasks.{task.name}.metric: {error}') from error


def val_loader(task: Task, shard: bool = True) -> DataLoader:
    """The task's validation set in order; under torch.distributed with ``shard``, this rank's shard (samples rank,
    rank + world, ...), which ``evaluate`` merges back."""
    rank, world = rank_and_world() if shard else (0, 1)
    dataset = task.val_dataset if world == 1 else Subset(task.val_dataset, range(rank, len(task.val_dataset), world))
    return DataLoader(dataset, batch_size=task.val_batch_size, shuffle=False,
                      num_workers=task.num_workers, collate_fn=collate_fn_for(task, 'val'))


@torch.no_grad()
def evaluate(model: MultiTaskModel, tasks: Mapping[str, Task], picture_dir: Path | None = None,
             step: int | None = None, autocast: dict | None = None, shard: bool = True) -> dict[str, dict[str, float]]:
    """Metrics of every task that has a validation set; with ``picture_dir``, a PNG of sample predictions each.

    Under torch.distributed every rank evaluates its shard and the metrics are merged, so every rank returns the
    metrics of the whole validation set (batch-dependent metrics such as view retrieval see the shards' batches).
    """
    device = next(model.parameters()).device
    # evaluation draws random numbers (MAE's masks): a private, fixed stream makes every evaluation see the same
    # masks and leaves the training stream, and so the training run, unchanged by how often it is evaluated
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(0)
        return _evaluate(model, tasks, device, picture_dir, step, autocast, shard)


def _evaluate(model, tasks, device, picture_dir, step, autocast, shard) -> dict[str, dict[str, float]]:
    autocast = autocast or dict(device_type=device.type, enabled=False)
    was_training = model.training
    model.eval()
    results = {}
    for task in tasks.values():
        if task.val_dataset is None:
            continue
        metric = build_metric(task)
        for i, batch in enumerate(val_loader(task, shard)):
            batch = move_to(batch, device)
            with torch.autocast(**autocast):
                predictions = model.predict(task.name, batch['images'])
            metric.update(predictions, batch['targets'])
            if i == 0 and picture_dir is not None:
                from mtvision.visualization import save_prediction_grid  # matplotlib only when drawing
                suffix = f'_iter_{step}' if step is not None else ''
                save_prediction_grid(picture_dir / f'{task.name}{suffix}.png', task.type, batch['images'],
                                     batch['targets'], predictions, task.mean, task.std, task.class_names)
        if shard and rank_and_world()[1] > 1:
            metric.merge(all_gather_objects(metric.state()))
        results[task.name] = metric.compute()
    model.train(was_training)
    return results


def metrics_table(results: Mapping[str, Mapping[str, float]],
                  baseline: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """A plain-text table, one row per task and metric; with ``baseline``, its values beside the results."""
    rows = [('task', 'metric', 'untrained', 'value') if baseline else ('task', 'metric', 'value')]
    for task, values in results.items():
        for key, value in values.items():
            row = (task, key, f'{baseline[task][key]:.4g}') if baseline and key in baseline.get(task, {}) else (
                (task, key, '') if baseline else (task, key))
            rows.append((*row, f'{value:.4g}'))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)
