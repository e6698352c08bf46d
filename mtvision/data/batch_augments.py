"""Batch augments: random erasing, MixUp and CutMix on normalised batches, on the device.

A task lists them in ``tasks.<name>.batch_augments``::

    batch_augments = [dict(type='RandomErasing', prob=0.25),              # DeiT's --reprob 0.25 --remode pixel
                      dict(type='MixUp', alpha=0.8), dict(type='CutMix', alpha=1.0)]

Why here and not in the workers' pipeline: the loaders send uint8 images and normalise them on the device
(:mod:`mtvision.data.prefetch`). MixUp's weighted sum of uint8 images would round every pixel, and random erasing
fills with noise of the *normalised* space (timm's ``mode='pixel'``: N(0, 1) per pixel). So both run after
:func:`~mtvision.data.prefetch.to_device`, on float batches, where timm (``PrefetchLoader``'s random erasing, the
``Mixup`` call in its training loop) and mmpretrain (the data preprocessor's ``batch_augments``) run them too.
Normalisation is affine and the mixing weights sum to one, so mixing normalised images equals normalising the
mixed float images: nothing is lost by mixing after it.

Label-preserving augments (:class:`RandomErasing`) run on every batch, in their order; then one of the mixing
augments (:class:`MixUp`, :class:`CutMix`) is drawn per batch, each with its ``prob`` (timm's ``Mixup`` with
``switch_prob``, mmpretrain's ``RandomBatchAugment``): equal shares summing to one when no ``prob`` is given, and
when all are given, the rest of the probability leaves the batch unmixed. With a mixing augment the targets become
soft ``FloatTensor[B, K]`` (one-hot when unmixed). Label smoothing is the head's (``label_smoothing``), applied to
hard and soft targets alike: smoothing is affine too, so it gives timm's ``Mixup(label_smoothing=...)`` targets.

Every random draw comes from torch's global generators (CPU for the parameters, the images' device for noise),
which checkpoints save, so a resumed run augments as the uninterrupted one does.
"""
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.registry import Registry
from torch import Tensor

__all__ = ['BATCH_AUGMENTS', 'BatchAugments', 'CutMix', 'MixUp', 'RandomErasing', 'augment_batches',
           'batch_augment_for', 'build_batch_augments']

BATCH_AUGMENTS = Registry('batch augment')


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(high: int) -> int:
    """An int in [0, high)."""
    return int(torch.randint(high, ()).item())


def _beta(alpha: float) -> float:
    return torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha))).sample().item()


@BATCH_AUGMENTS.register_module()
class RandomErasing:
    """Random erasing (Zhong et al. 2020) of a normalised batch, each image on its own, as timm's ``RandomErasing``.

    With probability ``prob`` an image gets one rectangle of area ``scale`` of the image's (uniform) and aspect
    ``ratio`` (log-uniform); a draw that does not fit is redrawn, up to ``max_attempts`` times. The rectangle is
    filled, in normalised units, with 0 (``'const'``: the dataset's mean colour), one N(0, 1) value per channel
    (``'rand'``) or per pixel (``'pixel'``, DeiT's choice). Labels are untouched.
    """

    mixes_labels = False

    def __init__(self, prob: float = 0.25, scale: Sequence[float] = (0.02, 1 / 3),
                 ratio: Sequence[float] = (0.3, 1 / 0.3), mode: str = 'pixel', max_attempts: int = 10):
        if not 0 <= prob <= 1:
            raise ValueError(f'RandomErasing prob must be in [0, 1], got {prob}')
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f'RandomErasing scale must be (low, high) with 0 < low <= high <= 1, got {scale}')
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f'RandomErasing ratio must be (low, high) with 0 < low <= high, got {ratio}')
        if mode not in ('const', 'rand', 'pixel'):
            raise ValueError(f"RandomErasing mode must be 'const', 'rand' or 'pixel', got {mode!r}")
        self.prob, self.scale, self.mode, self.max_attempts = prob, tuple(scale), mode, max_attempts
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def box(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """``(top, left, box_height, box_width)`` of one erased rectangle, or None (no draw fitted)."""
        for _ in range(self.max_attempts):
            area = _uniform(*self.scale) * height * width
            aspect = math.exp(_uniform(*self.log_ratio))
            box_height, box_width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < box_height < height and 0 < box_width < width:
                return _randint(height - box_height + 1), _randint(width - box_width + 1), box_height, box_width
        return None

    def __call__(self, images: Tensor, targets: Any) -> tuple[Tensor, Any]:
        erased = images.clone()  # the batch's images may be the host batch's own tensor (CPU, no normalisation)
        channels, height, width = images.shape[-3:]
        for index in range(images.shape[0]):
            if torch.rand(()).item() >= self.prob:
                continue
            box = self.box(height, width)
            if box is None:
                continue
            top, left, box_height, box_width = box
            region = erased[index, :, top:top + box_height, left:left + box_width]
            if self.mode == 'const':
                region.zero_()
            else:
                shape = (channels, box_height, box_width) if self.mode == 'pixel' else (channels, 1, 1)
                region.copy_(torch.randn(shape, device=images.device).expand_as(region))
        return erased, targets

    def __repr__(self) -> str:
        return f'RandomErasing(prob={self.prob}, scale={self.scale}, mode={self.mode!r})'


class _Mix:
    """Mixes each image with the image at the mirrored place of the batch (``flip(0)``, timm's batch mode), and its
    soft target with the same weight."""

    mixes_labels = True

    def __init__(self, alpha: float, prob: float | None = None):
        if alpha <= 0:
            raise ValueError(f'{type(self).__name__} alpha must be > 0, got {alpha}')
        if prob is not None and not 0 <= prob <= 1:
            raise ValueError(f'{type(self).__name__} prob must be in [0, 1], got {prob}')
        self.alpha, self.prob = alpha, prob

    def mix_images(self, images: Tensor) -> tuple[Tensor, float]:
        """The mixed images and the weight of each image's own target."""
        raise NotImplementedError

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``targets``: soft ``FloatTensor[B, K]``."""
        mixed, weight = self.mix_images(images)
        return mixed, targets.mul(weight).add_(targets.flip(0), alpha=1 - weight)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(alpha={self.alpha}, prob={self.prob})'


@BATCH_AUGMENTS.register_module()
class MixUp(_Mix):
    """MixUp (Zhang et al. 2018): ``lam * x + (1 - lam) * x.flip(0)``, ``lam ~ Beta(alpha, alpha)`` per batch; DeiT's
    ``alpha=0.8``."""

    def __init__(self, alpha: float = 0.8, prob: float | None = None):
        super().__init__(alpha, prob)

    def mix_images(self, images: Tensor) -> tuple[Tensor, float]:
        weight = _beta(self.alpha)
        return images.mul(weight).add_(images.flip(0), alpha=1 - weight), weight


@BATCH_AUGMENTS.register_module()
class CutMix(_Mix):
    """CutMix (Yun et al. 2019): a box of ``sqrt(1 - lam)`` of each side, ``lam ~ Beta(alpha, alpha)``, centred
    anywhere and clipped to the image, pasted from ``x.flip(0)``; the target weight is the share of the image left
    outside the box (timm's ``correct_lam``). DeiT's ``alpha=1.0``."""

    def __init__(self, alpha: float = 1.0, prob: float | None = None):
        super().__init__(alpha, prob)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` of the pasted box, clipped to the image (timm's ``rand_bbox``)."""
        side = math.sqrt(1 - _beta(self.alpha))
        cut_height, cut_width = int(height * side), int(width * side)
        centre_y, centre_x = _randint(height), _randint(width)
        return (min(max(centre_y - cut_height // 2, 0), height), min(max(centre_y + cut_height // 2, 0), height),
                min(max(centre_x - cut_width // 2, 0), width), min(max(centre_x + cut_width // 2, 0), width))

    def mix_images(self, images: Tensor) -> tuple[Tensor, float]:
        height, width = images.shape[-2:]
        top, bottom, left, right = self.box(height, width)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
        return mixed, 1 - (bottom - top) * (right - left) / (height * width)


class BatchAugments:
    """A task's batch augments: the label-preserving ones in order, then one mixing augment drawn per batch.

    Called on a batch ``dict(images=FloatTensor[B, 3, H, W], targets=...)``, it returns a new dict (the other keys
    kept); with mixing augments the targets must be class indices ``LongTensor[B]`` and become ``FloatTensor[B, K]``.
    """

    def __init__(self, augments: Sequence, num_classes: int | None = None, where: str = 'batch_augments'):
        self.where = where
        self.preserving = [augment for augment in augments if not augment.mixes_labels]
        self.mixing = [augment for augment in augments if augment.mixes_labels]
        if self.mixing and not (isinstance(num_classes, int) and num_classes > 1):
            raise ValueError(f'{where}: {self.mixing[0]!r} mixes class labels and needs the head\'s num_classes '
                             f'(> 1), got {num_classes!r}')
        self.num_classes = num_classes
        probs = [augment.prob for augment in self.mixing]
        if all(prob is None for prob in probs):
            probs = [1 / len(probs)] * len(probs)
        elif any(prob is None for prob in probs):
            raise ValueError(f'{where}: give prob to every mixing augment or to none (then they share the batches '
                             f'equally), got {self.mixing!r}')
        elif sum(probs) > 1 + 1e-6:
            raise ValueError(f'{where}: the probs of the mixing augments sum to {sum(probs):g} > 1')
        self.probs = probs

    def _draw_mixing(self):
        draw, cumulative = torch.rand(()).item(), 0.0
        for augment, prob in zip(self.mixing, self.probs):
            cumulative += prob
            if draw < cumulative:
                return augment
        return None

    def __call__(self, batch: Mapping) -> dict:
        images, targets = batch['images'], batch['targets']
        if not images.is_floating_point():
            raise TypeError(f'{self.where}: batch augments work on float, normalised images, got {images.dtype}')
        for augment in self.preserving:
            images, targets = augment(images, targets)
        if self.mixing:
            if not isinstance(targets, Tensor) or targets.dtype != torch.int64 or targets.shape != images.shape[:1]:
                found = f'{targets.dtype} {list(targets.shape)}' if isinstance(targets, Tensor) else \
                    type(targets).__name__
                raise TypeError(f'{self.where}: MixUp and CutMix mix class indices LongTensor[{images.shape[0]}], '
                                f'got {found}')
            targets = F.one_hot(targets, self.num_classes).float()
            augment = self._draw_mixing()
            if augment is not None:
                images, targets = augment(images, targets)
        return dict(batch, images=images, targets=targets)

    def __repr__(self) -> str:
        return f'BatchAugments({self.preserving + self.mixing!r}, probs={self.probs})'


def build_batch_augments(cfgs: Sequence[Mapping], num_classes: int | None = None,
                         where: str = 'batch_augments') -> BatchAugments | None:
    """:class:`BatchAugments` from config dicts (``type`` names a ``BATCH_AUGMENTS`` entry); None for an empty list."""
    if isinstance(cfgs, Mapping) or not isinstance(cfgs, Sequence):
        raise TypeError(f'{where} is a list of batch augment configs, got {type(cfgs).__name__}: {cfgs!r}')
    augments = []
    for index, cfg in enumerate(cfgs):
        name = cfg.get('type') if isinstance(cfg, Mapping) else None
        if name not in BATCH_AUGMENTS.module_dict:
            raise KeyError(f'{where}[{index}]: {cfg!r} names no batch augment; known: '
                           f'{sorted(BATCH_AUGMENTS.module_dict)} (per-image transforms go in the dataset pipeline)')
        try:
            augments.append(BATCH_AUGMENTS.build(dict(cfg)))
        except (TypeError, ValueError) as error:
            raise type(error)(f'{where}[{index}]: {error}') from error
    return BatchAugments(augments, num_classes, where) if augments else None


def batch_augment_for(task) -> BatchAugments | None:
    """The batch augments of ``task`` (a :class:`~mtvision.tasks.Task`), None when it has none. Mixing augments
    need a task whose batches hold class indices (the classification collate)."""
    where = f'tasks.{task.name}.batch_augments'
    augment = build_batch_augments(task.batch_augments, task.head.get('num_classes'), where)
    if augment is not None and augment.mixing:
        from mtvision.data.collate import COLLATE_FNS, collate_classification

        if COLLATE_FNS[task.type] is not collate_classification:
            raise ValueError(f'{where}: MixUp and CutMix mix class labels; tasks.{task.name} is of type '
                             f'{task.type!r}, whose targets are not class indices')
    return augment


def augment_batches(pairs: Iterable[tuple[Any, Mapping]], augment: BatchAugments | None
                    ) -> Iterator[tuple[Any, Mapping]]:
    """An iterator over ``(host_batch, device_batch)`` pairs (a :class:`~mtvision.data.prefetch.DevicePrefetcher`)
    with ``augment`` applied to each device batch when it is drawn; the host batch keeps the collated targets.
    Without augments, the pairs' own iterator (started now, as ``iter`` starts it)."""
    iterator = iter(pairs)
    if augment is None:
        return iterator
    return ((host, augment(device_batch)) for host, device_batch in iterator)
