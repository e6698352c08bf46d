"""Batches on the device: normalisation after the copy, and a copy one batch ahead on a side CUDA stream.

Pipelines end with ``ToFloat`` + ``Normalize``; the loaders stop them before those two steps
(:func:`defer_normalization`), so workers hand over uint8 images (a quarter of the bytes to pickle between processes,
pin and copy) and :func:`to_device` normalises them after the copy, as mmpretrain's ``data_preprocessor`` and timm's
``PrefetchLoader`` do. ``(x / 255 - mean) / std`` is what the two steps compute, so the batches are the same on
every device. :class:`DevicePrefetcher` is timm's ``PrefetchLoader`` pattern: while the model works on batch ``n``,
batch ``n + 1`` is copied from pinned memory and normalised on a side stream.
"""
import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

from mtvision.data.transforms import MultiView, ToFloat

__all__ = ['DevicePrefetcher', 'Normalization', 'defer_normalization', 'move_to', 'to_device']


@dataclass(frozen=True)
class Normalization:
    """``ToFloat`` + ``Normalize(mean, std)`` applied to a uint8 batch ``[B, 3, H, W]``: ``(x / 255 - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    # per device, made once: a new small tensor each batch would be a copy from pageable memory each time
    _stats: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __call__(self, images: Tensor) -> Tensor:
        if images.is_floating_point():
            raise TypeError(f'deferred normalisation expects uint8 images, got {images.dtype}')
        if images.device not in self._stats:
            self._stats[images.device] = tuple(
                torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).to(images.device, non_blocking=True)
                for values in (self.mean, self.std))
        mean, std = self._stats[images.device]
        # the order of ToFloat's scale and Normalize's sub_/div_, so both give the same floats
        return images.float().div_(255).sub_(mean).div_(std)


def _split_tail(pipeline) -> tuple[Any, Normalization] | None:
    """``pipeline`` without a final ``ToFloat`` + ``Normalize`` and the two as a :class:`Normalization`; for a
    ``MultiView`` whose every view pipeline ends so (with the same statistics), the views without them."""
    if isinstance(pipeline, MultiView):
        split = [_split_tail(view) for view in pipeline.pipelines]
        if not split or any(part is None for part in split) or len({norm for _, norm in split}) != 1:
            return None
        views = copy.copy(pipeline)
        views.pipelines = [view for view, _ in split]
        return views, split[0][1]
    if not isinstance(pipeline, v2.Compose):
        return None
    steps = list(pipeline.transforms)
    if steps and not isinstance(steps[-1], (v2.Normalize, ToFloat)):
        tail = _split_tail(steps[-1])  # a pipeline ending in MultiView
        if tail is None:
            return None
        return v2.Compose(steps[:-1] + [tail[0]]), tail[1]
    if len(steps) < 2 or type(steps[-2]) is not ToFloat or not isinstance(steps[-1], v2.Normalize):
        return None
    normalize = steps[-1]
    stats = Normalization(tuple(map(float, normalize.mean)), tuple(map(float, normalize.std)))
    return v2.Compose(steps[:-2] or [v2.Identity()]), stats


def defer_normalization(dataset) -> tuple[Any, Normalization | None]:
    """A shallow copy of ``dataset`` whose pipeline stops before its final ``ToFloat`` + ``Normalize``, and those
    two steps; ``(dataset, None)`` when its pipeline does not end so (its images are then given as they come).

    Wrappers (``ImagesOf``, ``SkipBadSamples``) are looked through: an empty own pipeline, or none, passes the
    question to the wrapped ``dataset``. The dataset itself is left as it is, for code that reads samples directly.
    """
    own = vars(dataset)
    pipeline = own.get('pipeline')
    split = _split_tail(pipeline) if pipeline is not None else None
    if split is not None:
        deferred = copy.copy(dataset)
        deferred.pipeline = split[0]
        return deferred, split[1]
    if 'dataset' in own and (pipeline is None or _is_identity(pipeline)):
        inner, normalization = defer_normalization(own['dataset'])
        if normalization is not None:
            deferred = copy.copy(dataset)
            deferred.dataset = inner
            return deferred, normalization
    return dataset, None


def _is_identity(pipeline) -> bool:
    return isinstance(pipeline, v2.Compose) and all(isinstance(step, v2.Identity) for step in pipeline.transforms)


def move_to(obj, device: torch.device, _copies: dict | None = None):
    """Tensors inside nested dicts, lists and tuples moved to ``device`` (detection targets are lists of dicts).

    A tensor that appears twice (MAE's ``targets`` are its ``images``) is copied once and appears twice on the
    device too."""
    copies = {} if _copies is None else _copies
    if isinstance(obj, Tensor):
        if id(obj) not in copies:
            copies[id(obj)] = (obj, obj.to(device, non_blocking=True))  # the source kept: its id stays its own
        return copies[id(obj)][1]
    if isinstance(obj, Mapping):
        return {key: move_to(value, device, copies) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(value, device, copies) for value in obj)
    return obj


IMAGE_KEYS = ('images', 'local_images')  # the batch entries that hold network inputs (local: DINO's small crops)


def to_device(batch: Mapping, device: torch.device, normalization: Normalization | None = None) -> dict:
    """``batch`` on ``device`` with float, normalised images (``IMAGE_KEYS``; ``targets`` that were the images,
    MAE's, the same normalised tensor). Without ``normalization`` the images must already be float."""
    host_images = batch['images']
    if normalization is None and not host_images.is_floating_point():
        raise TypeError(f'batch images must be float, got {host_images.dtype}: end the pipeline with ToFloat and '
                        f'Normalize')
    moved = move_to(batch, device)
    if normalization is not None:
        for key in IMAGE_KEYS:
            if key in moved:
                images = normalization(moved[key])
                moved = {name: images if value is moved[key] else value for name, value in moved.items()}
    return moved


def _tensors(obj) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


class DevicePrefetcher:
    """Iterate ``(host_batch, device_batch)`` pairs of ``batches`` (a DataLoader or any iterable of collated
    batches): the host batch as collated (targets readable without a device sync), the device batch as
    :func:`to_device` makes it.

    On CUDA the next batch is copied (``non_blocking``, from the loader's pinned memory) and normalised on a side
    stream while the caller works on the current one; before a batch is handed out the current stream waits for
    that copy, and its tensors are marked as used by the current stream (``record_stream``), so the caching
    allocator does not give their memory to a later copy while kernels queued on the current stream still read
    them. ``run_ahead`` (default: whether ``batches`` is a loader with worker processes) says whether the next
    batch may be drawn early. Elsewhere each batch is moved when it is drawn: the same values, with no overlap. With
    ``with_host=False`` it iterates the device batches alone.
    """

    def __init__(self, batches: Iterable, device: torch.device | str,
                 normalization: Normalization | None = None, with_host: bool = True, run_ahead: bool | None = None):
        self.batches = batches
        self.device = torch.device(device)
        self.normalization = normalization
        self.with_host = with_host
        # a batch built in this process (a loader without workers) draws its augmentations from this process's
        # random generators: built ahead, it would draw them before the current step draws its own and before a
        # checkpoint saves their state, and a resumed run would augment differently
        self.run_ahead = getattr(batches, 'num_workers', 0) > 0 if run_ahead is None else run_ahead
        self._stream = torch.cuda.Stream(self.device) if self.device.type == 'cuda' else None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        for host, device_batch in self._pairs():
            yield (host, device_batch) if self.with_host else device_batch

    def _pairs(self) -> Iterator[tuple[Any, dict]]:
        iterator = iter(self.batches)
        if self._stream is None or not self.run_ahead:
            for host in iterator:
                yield host, to_device(host, self.device, self.normalization)
            return
        ahead = self._copy_next(iterator)
        while ahead is not None:
            host, device_batch = ahead
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            for tensor in _tensors(device_batch):
                tensor.record_stream(current)
            ahead = self._copy_next(iterator)  # issued before the caller queues its work on this batch
            yield host, device_batch

    def _copy_next(self, iterator: Iterator) -> tuple[Any, dict] | None:
        host = next(iterator, None)
        if host is None:
            return None
        with torch.cuda.stream(self._stream):
            return host, to_device(host, self.device, self.normalization)
