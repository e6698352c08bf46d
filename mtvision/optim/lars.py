"""LARS: SGD with momentum and a layer-wise trust ratio, as MAE's linear probe uses it (MAE ``util/lars.py``)."""
from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., 2017) with MAE's conventions.

    For every parameter of more than one dimension (weight matrices and kernels), the gradient first gets the
    weight decay term, ``g <- g + weight_decay * p``, then is rescaled to ``trust_coefficient * ||p||`` in norm,
    ``g <- g * trust_coefficient * ||p|| / ||g||`` (left unscaled where either norm is zero). Parameters of one
    dimension or less (biases, norm scales) skip both. Then SGD with momentum, without dampening:
    ``mu <- momentum * mu + g``, ``p <- p - lr * mu``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        weight_decay: decay of the parameters of more than one dimension.
        momentum: momentum factor.
        trust_coefficient: the target ratio of update norm to parameter norm (before ``lr``).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float, weight_decay: float = 0.0,
                 momentum: float = 0.9, trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f'LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1 and trust_coefficient > 0; '
                             f'got lr={lr}, weight_decay={weight_decay}, momentum={momentum}, '
                             f'trust_coefficient={trust_coefficient}')
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group['params']:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:
                    update = update.add(param, alpha=group['weight_decay'])
                    param_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
                    # torch.where rather than a Python branch: no device-to-host sync per parameter
                    ratio = torch.where((param_norm > 0) & (update_norm > 0),
                                        group['trust_coefficient'] * param_norm / update_norm,
                                        torch.ones_like(param_norm))
                    update = update.mul(ratio)
                state = self.state[param]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(param)
                buffer = state['momentum_buffer']
                buffer.mul_(group['momentum']).add_(update)
                param.add_(buffer, alpha=-group['lr'])
        return loss


__all__ = ['LARS']
