"""Aggregators: how the per-task losses of a step become gradients on the parameters.

Every aggregator has one job, ``backward``: given this step's task losses, the shared parameters and each task's
own parameters, write ``.grad`` on every trainable parameter. The weighted sum needs one backward pass; gradient
surgery (PCGrad, Aligned-MTL) takes one backward per task to get the per-task gradients of the shared parameters.
"""
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtvision.distributed import average_over_ranks
from mtvision.optim.gradient_surgery import (AlignedMTLWeighting, PCGradWeighting, combine, gram_diagnostics,
                                             gram_from_gradients)
from mtvision.registry import AGGREGATORS


class Aggregator(ABC):
    """Base class. ``loss_weights`` maps each task to the weight of its loss (from the task's ``loss_weight``)."""

    def __init__(self, loss_weights: Mapping[str, float]):
        self.loss_weights = dict(loss_weights)

    supports_accumulation = True

    @abstractmethod
    def backward(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter],
                 task_params: Mapping[str, Sequence[nn.Parameter]] | None = None, *,
                 scale: float = 1.0) -> dict[str, float]:
        """Write ``.grad`` for this step's ``losses`` (tasks absent from the step are simply missing);
        ``task_params`` are the parameters only that task's loss reaches (its head); ``scale`` is the factor the
        trainer multiplied the losses by (grad-scaler scale / accumulation steps), for aggregators whose own terms
        must carry it too.

        Returns scalars worth logging.
        """

    def state_dict(self) -> dict:
        """What a resumed run needs to continue identically (random generators); empty by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def weighted_losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        unknown = set(losses) - set(self.loss_weights)
        if unknown:
            raise KeyError(f'losses for tasks without a loss weight: {sorted(unknown)}')
        return {task: self.loss_weights[task] * loss for task, loss in losses.items()}


@AGGREGATORS.register_module()
class WeightedSum(Aggregator):
    """``sum_t w_t * L_t``, one backward pass."""

    def backward(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter],
                 task_params: Mapping[str, Sequence[nn.Parameter]] | None = None, *,
                 scale: float = 1.0) -> dict[str, float]:
        total = torch.stack(list(self.weighted_losses(losses).values())).sum()
        total.backward()
        return {}


class GradientSurgery(Aggregator):
    """Parameter-level gradient surgery: per-task gradients ``G`` of the shared parameters, their float64 Gram
    matrix ``K``, weights ``w = f(K)`` (:mod:`mtvision.optim.gradient_surgery`), and ``w^T G`` written to ``.grad``.

    One ``autograd.grad`` per task of the step (the graph is kept between them), which also gives the task's own
    parameters their gradient: a head, and any shared parameter that only this task's loss reached in the step (a
    per-task MoE router), are updated with their own task's gradient, not through the surgery. Tasks absent from
    the step are absent from ``K``. The task losses arrive weighted by ``loss_weight`` (and by a grad scaler's
    common factor, which leaves the direction of both methods unchanged). Under torch.distributed the per-task
    gradients are averaged over the ranks before ``K`` is formed, so every rank computes the surgery of the global
    batch, and the methods' randomness is seeded alike on every rank; each rank holds ``G`` ([T, P]) for the step.
    A non-finite gradient gives NaN weights, so the step is skipped (grad scaler or not), never an exception.
    """

    supports_accumulation = False  # the surgery of a sum of micro-batches is not the sum of their surgeries

    @abstractmethod
    def weights(self, gram: Tensor, tasks: Sequence[str]) -> Tensor:
        """Weights ``[T]`` of the gradients of ``tasks``, from their Gram matrix ``[T, T]``."""

    def backward(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter],
                 task_params: Mapping[str, Sequence[nn.Parameter]] | None = None, *,
                 scale: float = 1.0) -> dict[str, float]:
        weighted = self.weighted_losses(losses)
        tasks = list(weighted)
        shared = [p for p in shared_params if p.requires_grad]
        per_task = []
        for task in tasks:
            own = [p for p in (task_params or {}).get(task, ()) if p.requires_grad]
            grads = torch.autograd.grad(weighted[task], shared + own, retain_graph=task != tasks[-1],
                                        allow_unused=True)
            per_task.append(list(grads[:len(shared)]))
            _accumulate(own, grads[len(shared):])
        surgery_params, buckets = [], []
        for index, param in enumerate(shared):
            grads = [task_grads[index] for task_grads in per_task]
            for task_grads in per_task:  # stacked below: drop the loose copy, so G is held once, not twice
                task_grads[index] = None
            reached = [grad for grad in grads if grad is not None]
            if len(reached) == 1:  # only one task's loss reached it: that task's own parameter this step
                _accumulate([param], reached)
            elif reached:
                surgery_params.append(param)
                buckets.append(torch.stack([torch.zeros_like(param) if g is None else g for g in grads]))
        average_over_ranks(buckets)
        gram = gram_from_gradients(buckets)
        weights = self.weights(gram, tasks)
        _accumulate(surgery_params, combine(weights, buckets))
        return self.diagnostics(tasks, gram, weights, buckets)

    def diagnostics(self, tasks: Sequence[str], gram: Tensor, weights: Tensor, buckets: Sequence[Tensor]) -> dict:
        """Scalars for the log: per task the gradient norm and weight, pairwise cosines, the update's norm, and
        the Gram matrix's rank and smallest kept eigenvalue."""
        stats = gram_diagnostics(gram)
        scalars = {'surgery/rank': stats['rank'], 'surgery/min_eigenvalue': stats['min_eigenvalue']}
        for i, task in enumerate(tasks):
            scalars[f'surgery/norm/{task}'] = float(stats['norms'][i])
            scalars[f'surgery/weight/{task}'] = float(weights[i])
            for j in range(i + 1, len(tasks)):
                scalars[f'surgery/cosine/{task}-{tasks[j]}'] = float(stats['cosines'][i, j])
        update = weights.to(torch.float64) @ gram @ weights.to(torch.float64)  # ||w^T G||^2 = w^T K w
        scalars['surgery/norm/update'] = float(update.clamp(min=0).sqrt()) if torch.isfinite(update) else float('nan')
        return scalars


def _accumulate(params: Sequence[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
    for param, grad in zip(params, grads):
        if grad is not None:
            param.grad = grad.detach() if param.grad is None else param.grad + grad


@AGGREGATORS.register_module()
class PCGrad(GradientSurgery):
    """PCGrad (Yu et al. 2020): each task's gradient, in a random order of the other tasks, loses its projection on
    every original gradient it conflicts with; the results are summed (``reduction='sum'``, the paper's) or
    averaged. The orders come from a generator seeded with ``seed``, saved in checkpoints."""

    def __init__(self, loss_weights: Mapping[str, float], reduction: str = 'sum', seed: int = 0):
        super().__init__(loss_weights)
        self.weighting = PCGradWeighting(reduction=reduction, seed=seed)

    def weights(self, gram: Tensor, tasks: Sequence[str]) -> Tensor:
        return self.weighting(gram)

    def state_dict(self) -> dict:
        return self.weighting.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.weighting.load_state_dict(state)


@AGGREGATORS.register_module()
class AlignedMTL(GradientSurgery):
    """Aligned-MTL (Senushkin et al. 2023): the task gradients made orthogonal with equal norms through the
    eigendecomposition of ``K``, scaled by its smallest kept eigenvalue (``scale_mode='min'``; or ``'median'``,
    ``'rmse'``), summed over the tasks with ``preference`` (ones: the official code's sum; torchjd averages).

    ``tolerance``: eigenvalues below ``tolerance * largest`` are dropped; the default ``T * float32 eps`` is the
    official code's, robust to the rounding of a Gram matrix over millions of parameters (it treats a task whose
    gradient norm is below about 1e-3 of the largest as absent).
    """

    def __init__(self, loss_weights: Mapping[str, float], scale_mode: str = 'min',
                 preference: Mapping[str, float] | None = None, tolerance: float | None = None):
        super().__init__(loss_weights)
        self.scale_mode = scale_mode
        self.preference = dict(preference) if preference is not None else None
        self.tolerance = tolerance
        AlignedMTLWeighting(scale_mode=scale_mode, tolerance=tolerance)  # checks the arguments

    def weights(self, gram: Tensor, tasks: Sequence[str]) -> Tensor:
        tolerance = self.tolerance if self.tolerance is not None else len(tasks) * torch.finfo(torch.float32).eps
        preference = None
        if self.preference is not None:  # in the order of this step's tasks
            preference = torch.tensor([self.preference[task] for task in tasks], dtype=torch.float64)
        return AlignedMTLWeighting(preference, self.scale_mode, tolerance)(gram)
