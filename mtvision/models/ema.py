"""Exponential moving averages of weights: MoCo's momentum encoders and the trainer's model EMA."""
import torch
from torch import nn

__all__ = ['ema_update']


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
