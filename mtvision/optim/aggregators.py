"""Aggregators: how the per-task losses of a step become gradients on the parameters.

Every aggregator has one job, ``backward``: given this step's task losses and the shared parameters, write
``.grad`` on every trainable parameter. The weighted sum needs one backward pass; gradient-surgery methods,
which need per-task gradients of the shared parameters, plug in behind the same interface.
"""
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtvision.registry import AGGREGATORS


class Aggregator(ABC):
    """Base class. ``loss_weights`` maps each task to the weight of its loss (from the task's ``loss_weight``)."""

    def __init__(self, loss_weights: Mapping[str, float]):
        self.loss_weights = dict(loss_weights)

    @abstractmethod
    def backward(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter]) -> dict[str, float]:
        """Write ``.grad`` for this step's ``losses`` (tasks absent from the step are simply missing).

        Returns scalars worth logging.
        """

    def weighted_losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        unknown = set(losses) - set(self.loss_weights)
        if unknown:
            raise KeyError(f'losses for tasks without a loss weight: {sorted(unknown)}')
        return {task: self.loss_weights[task] * loss for task, loss in losses.items()}


@AGGREGATORS.register_module()
class WeightedSum(Aggregator):
    """``sum_t w_t * L_t``, one backward pass."""

    def backward(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter]) -> dict[str, float]:
        total = torch.stack(list(self.weighted_losses(losses).values())).sum()
        total.backward()
        return {}
