"""What a head may ask of the model besides ``forward``, ``loss`` and ``predict``: protocols that
:class:`~mtvision.models.multitask.MultiTaskModel` and the FLOP count check with ``isinstance``."""
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ['MaskedImageHead', 'MaskedTokenHead', 'MomentumHead', 'ScheduledHead']


@runtime_checkable
class MaskedImageHead(Protocol):
    """A head trained on masked images (MAE, SimMIM): the backbone is called with ``mask_ratio`` for it."""

    mask_ratio: float


@runtime_checkable
class MomentumHead(Protocol):
    """A head with a momentum encoder (MoCo v3): the model keeps a momentum copy of the backbone for its task, passes
    that copy's features as the head's second argument, and after each update moves the copy and calls
    ``update_momentum`` with ``cosine_momentum(momentum, step, max_steps)``."""

    momentum: float

    def update_momentum(self, momentum: float) -> None: ...


@runtime_checkable
class MaskedTokenHead(Protocol):
    """A head trained on images some of whose patches a mask token replaces (iBOT): in training the model asks it
    for a patch mask and calls the backbone with ``patch_mask`` and the head's ``mask_token``; a None mask (or
    evaluation) is a plain forward."""

    mask_token: Tensor | None

    def sample_patch_mask(self, rows: int, num_patches: int, device: torch.device) -> Tensor | None: ...


@runtime_checkable
class ScheduledHead(Protocol):
    """A head whose loss follows the training step (DINO's teacher temperature warm-up): the trainer calls
    ``start_step(step, max_steps)`` before each step's forward, so a resumed run sees the same schedule."""

    def start_step(self, step: int, max_steps: int) -> None: ...
