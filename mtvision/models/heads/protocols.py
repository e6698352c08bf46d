"""What a head may ask of the model besides ``forward``, ``loss`` and ``predict``: protocols that
:class:`~mtvision.models.multitask.MultiTaskModel` and the FLOP count check with ``isinstance``."""
from typing import Protocol, runtime_checkable

__all__ = ['MaskedImageHead', 'MomentumHead']


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
