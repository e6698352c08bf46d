"""Exponential moving averages of weights: MoCo's momentum encoders and the trainer's model EMA."""
import math

import torch
from torch import nn

__all__ = ['cosine_momentum', 'ema_update']


def cosine_momentum(base: float, step: int, max_steps: int) -> float:
    """MoCo v3 / BYOL's schedule: ``1 - (1 - base) * (cos(pi * step / max_steps) + 1) / 2``, from ``base`` at step 0
    to 1 at the end."""
    progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float, copy_buffers: bool = False) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` for parameters. Buffers (BatchNorm statistics) are
    copied with ``copy_buffers`` (a model EMA evaluated on its own, as timm's), else left to the target's own
    forwards (MoCo v3's momentum encoder)."""
    target_params, online_params = list(target.parameters()), list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError('the momentum module and the online module have different parameters')
    for t, o in zip(target_params, online_params):
        t.lerp_(o.detach(), 1 - momentum)
    if copy_buffers:
        for t, o in zip(target.buffers(), online.buffers()):
            t.copy_(o)
