"""Per-task-type collate functions: a list of ``(image, target)`` samples -> ``dict(images=..., targets=...)``.

Each task type's spec (:mod:`mtvision.task_types`) names its collate function; :data:`COLLATE_FNS` looks it up.

Batches hold plain tensors (tv_tensor wrappers removed); see docs/ARCHITECTURE.md for the target formats. Images
are float, or uint8 when the loader defers ``ToFloat`` + ``Normalize`` to the device (:mod:`mtvision.data.prefetch`).
"""
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ['COLLATE_FNS', 'Sample', 'collate_classification', 'collate_crops', 'collate_detection',
           'collate_segmentation', 'collate_depth', 'collate_fn_for', 'collate_images', 'collate_multilabel',
           'collate_normals', 'collate_views', 'group_collate_fn']

_NAMED_FILES = 3  # per image size, in the error about a batch of mixed sizes


class Sample(tuple):
    """``(image, target)`` as the datasets return it, naming the file it was read from (``path``), so that a
    batch that cannot be collated names its files. Plain ``(image, target)`` tuples are accepted everywhere."""

    path: str | None

    def __new__(cls, image, target, path=None):
        sample = super().__new__(cls, (image, target))
        sample.path = None if path is None else str(path)
        return sample

    def __getnewargs__(self):  # pickle (DataLoader workers): tuple's own would drop the path
        return (*self, self.path)


def _plain(tensor: Tensor) -> Tensor:
    return tensor.as_subclass(Tensor)


def _mixed_sizes(samples: Sequence[Sample], shapes: list[tuple]) -> str:
    """Each image size of a batch with its count and (some of) its files."""
    files: dict[tuple, list[str]] = {}
    for sample, shape in zip(samples, shapes):
        files.setdefault(shape, []).append(repr(getattr(sample, 'path', None) or '<unnamed>'))
    same_channels = len({shape[:-2] for shape in shapes}) == 1
    parts = []
    for shape, names in sorted(files.items(), key=lambda item: -len(item[1])):
        size = 'x'.join(map(str, shape[-2:] if same_channels else shape))
        more = f' and {len(names) - _NAMED_FILES} more' if len(names) > _NAMED_FILES else ''
        count = f'{len(names)} image{"s" if len(names) > 1 else ""}'
        parts.append(f'{size} in {count} ({", ".join(names[:_NAMED_FILES])}{more})')
    return '; '.join(parts)


def _stack_images(samples: Sequence[Sample]) -> Tensor:
    if not samples:
        raise ValueError('cannot collate an empty batch')
    images = [_plain(image) for image, _ in samples]
    # uint8: the loaders defer ToFloat + Normalize to the device (mtvision.data.prefetch)
    if not (images[0].is_floating_point() or images[0].dtype == torch.uint8):
        raise TypeError(f'batch images must be float, or uint8 to be normalised on the device, got '
                        f'{images[0].dtype}: end the pipeline with ToFloat and Normalize')
    shapes = [tuple(image.shape) for image in images]
    if len(set(shapes)) > 1:
        raise ValueError(f'images of one batch must share a size, got (height x width) '
                         f'{_mixed_sizes(samples, shapes)}: give the pipeline a transform to one fixed size, e.g. '
                         f'Resize(size=(h, w)), RandomResizedCrop(size=s) or RandomCrop(size=s, pad_if_needed=True)')
    return torch.stack(images)


def _stack_maps(samples: Sequence[Sample], dtype: torch.dtype) -> Tensor:
    return torch.stack([_plain(target) for _, target in samples]).to(dtype)


def collate_classification(samples: Sequence[Sample]) -> dict[str, Tensor]:
    """Targets: ``LongTensor[B]`` of class indices."""
    return dict(images=_stack_images(samples),
                targets=torch.tensor([int(label) for _, label in samples], dtype=torch.int64))


def collate_detection(samples: Sequence[Sample]) -> dict[str, Any]:
    """Targets: one dict per image with plain tensors, plus ``input_size=(H, W)`` of the batch images."""
    images = _stack_images(samples)
    input_size = tuple(images.shape[-2:])
    targets = []
    for _, target in samples:
        plain = {key: _plain(value) if isinstance(value, Tensor) else value for key, value in target.items()}
        plain['boxes'] = plain['boxes'].float()
        plain['labels'] = plain['labels'].long()
        plain['input_size'] = input_size
        targets.append(plain)
    return dict(images=images, targets=targets)


def collate_segmentation(samples: Sequence[Sample]) -> dict[str, Tensor]:
    """Targets: ``LongTensor[B, H, W]`` of class ids (ignore index kept)."""
    return dict(images=_stack_images(samples), targets=_stack_maps(samples, torch.int64))


def collate_depth(samples: Sequence[Sample]) -> dict[str, Tensor]:
    """Targets: ``FloatTensor[B, 1, H, W]`` in metres, 0 = invalid."""
    return dict(images=_stack_images(samples), targets=_stack_maps(samples, torch.float32))


def collate_normals(samples: Sequence[Sample]) -> dict[str, Tensor]:
    """Targets: ``FloatTensor[B, 3, H, W]`` unit surface normals, 0 = invalid."""
    return dict(images=_stack_images(samples), targets=_stack_maps(samples, torch.float32))


def collate_multilabel(samples: Sequence[Sample]) -> dict[str, Tensor]:
    """Targets: ``FloatTensor[B, K]`` multi-hot (1 present, 0 absent, -1 unknown)."""
    return dict(images=_stack_images(samples), targets=_stack_maps(samples, torch.float32))


def collate_images(samples: Sequence[Sample]) -> dict[str, Tensor]:
    """Self-supervised tasks: the targets are the images themselves (the same tensor, not a copy)."""
    images = _stack_images(samples)
    return dict(images=images, targets=images)


def collate_views(samples: Sequence[Sample]) -> dict[str, Any]:
    """Contrastive tasks: each sample's image is a tuple of ``V`` views (``MultiView``); ``images`` stacks them
    view-major, ``images[v * B + i]`` = view ``v`` of sample ``i``, so one backbone forward sees every view.
    There are no targets (``None``)."""
    views = [sample[0] for sample in samples]
    if not views or not isinstance(views[0], (tuple, list)):
        raise TypeError('a contrastive batch needs several views of each image: end the pipeline with '
                        "dict(type='MultiView', pipeline=[...])")
    num_views = len(views[0])
    if any(len(sample_views) != num_views for sample_views in views):
        raise ValueError(f'every sample of a contrastive batch must have {num_views} views, got '
                         f'{sorted({len(v) for v in views})}')
    images = torch.cat([_stack_images([Sample(sample_views[v], None, getattr(sample, 'path', None))
                                       for sample, sample_views in zip(samples, views)]) for v in range(num_views)])
    return dict(images=images, targets=None)


def collate_crops(samples: Sequence[Sample], num_global_crops: int = 2) -> dict[str, Any]:
    """Multi-crop batches (DINO): each sample's image is a tuple of crops (``MultiCrop``), the global crops first.
    ``images`` stacks the ``num_global_crops`` global crops view-major, ``images[v * B + i]`` = crop ``v`` of sample
    ``i``, and ``local_images`` the local crops, view-major too (absent without local crops): crops of different
    sizes go through the backbone in two forwards. There are no targets (``None``)."""
    views = [sample[0] for sample in samples]
    if not views or not isinstance(views[0], (tuple, list)) or len(views[0]) < num_global_crops:
        raise TypeError(f'a multi-crop batch needs at least {num_global_crops} crops of each image: end the pipeline '
                        f"with dict(type='MultiCrop', ...)")

    def part(crops: slice) -> Tensor:
        return collate_views([Sample(sample_views[crops], None, getattr(sample, 'path', None))
                              for sample, sample_views in zip(samples, views)])['images']

    batch = dict(images=part(slice(0, num_global_crops)), targets=None)
    if len(views[0]) > num_global_crops:
        batch['local_images'] = part(slice(num_global_crops, None))
    return batch


class _CollateOfTaskTypes(Mapping):
    """``{task type: collate function}`` of every type registered in ``mtvision.registry.TASK_TYPES``, read from
    the registry at each lookup (so a type registered later is there too)."""

    def __getitem__(self, task_type: str) -> Callable[[Sequence[Sample]], dict[str, Any]]:
        from mtvision.task_types import task_type_spec  # its type modules import this one's functions
        try:
            return task_type_spec(task_type).collate
        except ValueError as error:
            raise KeyError(str(error)) from None

    def __iter__(self) -> Iterator[str]:
        from mtvision.task_types import registered_task_types
        return iter(registered_task_types())

    def __len__(self) -> int:
        from mtvision.task_types import registered_task_types
        return len(registered_task_types())


COLLATE_FNS: Mapping[str, Callable[[Sequence[Sample]], dict[str, Any]]] = _CollateOfTaskTypes()


def _collate_for_task(collate: Callable, where: str, samples: Sequence[Sample]) -> dict[str, Any]:
    try:
        return collate(samples)
    except (TypeError, ValueError, RuntimeError) as error:
        if error.args and isinstance(error.args[0], str):  # the same error, its message saying where
            error.args = (f'{where}: {error.args[0]}', *error.args[1:])
        raise


def collate_fn_for(task, split: str = 'train') -> Callable[[Sequence[Sample]], dict[str, Any]]:
    """The collate function of ``task`` (a :class:`~mtvision.tasks.Task`) whose errors start with the dataset they
    come from, e.g. ``tasks.depth.train_dataset: images of one batch must share a size...``. Picklable, for
    DataLoader workers of any start method."""
    return functools.partial(_collate_for_task, COLLATE_FNS[task.type], f'tasks.{task.name}.{split}_dataset')


def _collate_group(collates: Mapping[str, tuple[str, Callable]], where: str, samples: Sequence[Sample]
                   ) -> dict[str, Any]:
    images, targets = None, {}
    for task, (key, collate) in collates.items():
        task_samples = []
        for index, sample in enumerate(samples):
            image, target = sample
            if not isinstance(target, Mapping) or key not in target:
                found = sorted(target) if isinstance(target, Mapping) else type(target).__name__
                raise KeyError(f'{where}: sample {index} ({getattr(sample, "path", None)}) has no {key!r} target for '
                               f'task {task!r}; it has {found}')
            task_samples.append(Sample(image, target[key], getattr(sample, 'path', None)))
        batch = _collate_for_task(collate, where, task_samples)
        images = batch['images'] if images is None else images
        targets[task] = batch['targets']
    return dict(images=images, targets=targets)


def group_collate_fn(group: str, tasks: Sequence) -> Callable[[Sequence[Sample]], dict[str, Any]]:
    """The collate function of a task group's batches: ``dict(images=..., targets={task: targets})``, each task's
    targets collated by its type's function from the entry of its type in every sample's target dict (what
    multi-target datasets such as ``DenseMultiTaskDataset`` return). Picklable, like :func:`collate_fn_for`."""
    collates = {task.name: (task.type, COLLATE_FNS[task.type]) for task in tasks}
    return functools.partial(_collate_group, collates, f'task_groups.{group}.train_dataset')
