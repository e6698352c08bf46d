"""Aggregators: how the per-task losses of a step become gradients on the parameters.

Every aggregator has one job, ``backward``: given this step's task losses, the shared parameters and each task's
own parameters, write ``.grad`` on every trainable parameter. The weighted sum needs one backward pass; gradient
surgery (PCGrad, Aligned-MTL) takes one backward per task to get the per-task gradients of the shared parameters.
"""
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtvision.distributed import (average_over_ranks, gather_shards, mean_shard_over_ranks, rank_and_world,
                                  sum_over_ranks)
from mtvision.optim.gradient_surgery import (AlignedMTLWeighting, PCGradWeighting, combine, gram_diagnostics,
                                             gram_from_gradients)
from mtvision.registry import AGGREGATORS


class Aggregator(ABC):
    """Base class. ``loss_weights`` maps each task to the weight of its loss (from the task's ``loss_weight``)."""

    def __init__(self, loss_weights: Mapping[str, float]):
        self.loss_weights = dict(loss_weights)

    supports_accumulation = True
    needs_features = False
    # whether ``backward`` writes the gradients of the shared parameters through one backward pass, which lets the
    # trainer exchange them over the ranks while that pass runs
    overlaps_exchange = True

    @abstractmethod
    def backward(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter],
                 task_params: Mapping[str, Sequence[nn.Parameter]] | None = None, *,
                 scale: float | Tensor = 1.0, features: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Write ``.grad`` for this step's ``losses`` (tasks absent from the step are simply missing);
        ``task_params`` are the parameters only that task's loss reaches (its head); ``scale`` is the factor the
        trainer multiplied the losses by (grad-scaler scale / accumulation steps), for aggregators whose own terms
        must carry it too; ``features`` maps each task to its backbone output of the step, for aggregators with
        ``needs_features`` (feature-level surgery).

        Returns scalars worth logging.
        """

    def attach(self, backbone: nn.Module, device: torch.device) -> list[nn.Parameter]:
        """Prepare to train ``backbone`` on ``device``; returns the loss weights this aggregator learns with the model
        (the run's optimizer trains them in :meth:`param_group`). None by default."""
        return []

    def param_group(self) -> dict:
        """The optimizer param group of the loss weights :meth:`attach` returned."""
        raise NotImplementedError(f'{type(self).__name__} learns no loss weights')

    def synchronized_parameters(self) -> list[nn.Parameter]:
        """The parameters whose ``.grad`` the last ``backward`` already averaged over the ranks (its own exchange):
        the trainer does not exchange them again. None by default."""
        return []

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
                 scale: float | Tensor = 1.0, features: Mapping[str, Any] | None = None) -> dict[str, float]:
        total = torch.stack(list(self.weighted_losses(losses).values())).sum()
        total.backward()
        return {}


class GradientSurgery(Aggregator):
    """Gradient surgery: per-task gradients, their float64 Gram matrix ``K``, weights ``w = f(K)``
    (:mod:`mtvision.optim.gradient_surgery`), and the update ``w^T G``.

    ``level='parameter'`` (default): ``G`` [T, P] holds the gradients of the shared parameters. How it is formed:

    * ``per_task_grads='loop'``: one ``autograd.grad`` per task of the step (the graph is kept between them);
      ``'batched'``: one vmapped ``autograd.grad`` of the stacked losses (``is_grads_batched``). Same result.
    * ``gram_chunks=None`` (materialised): ``G`` is held for the step and ``w^T G`` is written to ``.grad`` from it:
      extra memory ``T * P`` floats, no extra pass. ``gram_chunks=k``: the shared parameters are cut into ``k``
      groups of about equal size; ``K`` is accumulated one group at a time (``T`` gradient passes per group, down to
      that group only), so ``G`` is never held whole (extra memory ``T * P / k``), then one backward of
      ``sum_t w_t L_t`` writes ``w^T G``. Same result as materialised, for about ``(k + 1) / 2 + 1`` backward passes
      instead of one.

    A task's own parameters (its head), and any shared parameter that only this task's loss reached in the step (a
    per-task MoE router), are updated with their own task's gradient, not through the surgery.

    ``level='feature'`` (Aligned-MTL-UB, Senushkin et al. 2023; ``rep_grad`` in LibMTL): ``G`` holds the gradients
    of the task losses with respect to the shared representation (the backbone's output, passed as ``features``:
    ``{task: output}``), flattened over batch and features. These cost one pass through the heads only; then one
    backward of ``sum_t w_t L_t`` into the shared parameters (a per-task router included: at this level there is
    no per-parameter split). The heads get their own task's gradient. Tasks that
    see different images have orthogonal representation gradients (their rows of the representation are disjoint),
    so ``K`` is diagonal: Aligned-MTL then rescales each task's loss so that its representation gradient has the
    norm of the smallest (``scale_mode='min'``), and PCGrad changes nothing. Cross terms appear only where tasks
    share an output tensor (the same images through one backbone forward).

    The task losses arrive weighted by ``loss_weight`` (and by a grad scaler's common factor, which leaves both
    methods' weights unchanged). Tasks absent from the step are absent from ``K``. Under torch.distributed the
    per-task parameter gradients are averaged over the ranks before ``K`` is formed (feature level: the per-rank
    ``K`` are averaged, which is exact there because each rank's rows of the representation are its own), so
    every rank computes the surgery of the global batch; the methods' randomness is seeded alike on every rank. A
    non-finite gradient gives NaN weights, so the step is skipped (grad scaler or not), never an exception.

    The exchange at the parameter level moves ``(T + 1) / 2`` gradient sizes rather than ``T + 1``: ``G`` is
    reduce-scattered (each rank holds the mean over the ranks of a block of its columns), the blocks' Gram matrices
    are summed (``T x T`` numbers), each rank combines ``w^T`` with its block, and the blocks of the update are
    all-gathered. The update is then the same on every rank and is not exchanged again.
    """

    supports_accumulation = False  # the surgery of a sum of micro-batches is not the sum of their surgeries
    overlaps_exchange = False  # the heads' gradients come from autograd.grad before the shared parameters' pass

    def __init__(self, loss_weights: Mapping[str, float], level: str = 'parameter', per_task_grads: str = 'loop',
                 gram_chunks: int | None = None):
        super().__init__(loss_weights)
        if level not in ('parameter', 'feature'):
            raise ValueError(f"{type(self).__name__}: level must be 'parameter' or 'feature', got {level!r}")
        if per_task_grads not in ('loop', 'batched'):
            raise ValueError(f"{type(self).__name__}: per_task_grads must be 'loop' or 'batched', got "
                             f"{per_task_grads!r}")
        if gram_chunks is not None and (not isinstance(gram_chunks, int) or gram_chunks < 1):
            raise ValueError(f'{type(self).__name__}: gram_chunks must be None (materialised) or an int >= 1, got '
                             f'{gram_chunks!r}')
        if level == 'feature' and (gram_chunks is not None or per_task_grads != 'loop'):
            raise ValueError(f"{type(self).__name__}: gram_chunks and per_task_grads apply to level='parameter' "
                             f"only")
        self.level = level
        self.per_task_grads = per_task_grads
        self.gram_chunks = gram_chunks
        self._synchronized: list[nn.Parameter] = []

    @property
    def needs_features(self) -> bool:
        return self.level == 'feature'

    @abstractmethod
    def weights(self, gram: Tensor, tasks: Sequence[str]) -> Tensor:
        """Weights ``[T]`` of the gradients of ``tasks``, from their Gram matrix ``[T, T]``."""

    def backward(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter],
                 task_params: Mapping[str, Sequence[nn.Parameter]] | None = None, *,
                 scale: float | Tensor = 1.0, features: Mapping[str, Any] | None = None) -> dict[str, float]:
        weighted = self.weighted_losses(losses)
        tasks = list(weighted)
        self._synchronized = []
        shared = [p for p in shared_params if p.requires_grad]
        own = {task: [p for p in (task_params or {}).get(task, ()) if p.requires_grad] for task in tasks}
        if self.level == 'feature':
            gram = self._feature_gram(weighted, own, features)
            weights = self.weights(gram, tasks)
            _weighted_backward(weighted, weights, shared)
        elif self.gram_chunks is not None:
            gram, surgery_params = self._chunked_gram(weighted, shared, own)
            weights = self.weights(gram, tasks)
            _weighted_backward(weighted, weights, surgery_params)
        else:
            surgery_params, buckets = self._surgery_buckets(weighted, shared, own, retain_graph=False)
            if rank_and_world()[1] == 1:
                # the step's one read back: the T x T algebra, combine's coefficients and the diagnostics run on
                # this host copy of K
                gram = gram_from_gradients(buckets).cpu()
                weights = self.weights(gram, tasks)
                _accumulate(surgery_params, combine(weights, buckets))
            else:
                sizes = [param.numel() for param in surgery_params]
                shard = mean_shard_over_ranks(buckets)
                del buckets
                gram = sum_over_ranks(gram_from_gradients([shard])).cpu()
                weights = self.weights(gram, tasks)
                update = gather_shards(combine(weights, [shard])[0], sum(sizes)).to(surgery_params[0].device)
                _accumulate(surgery_params, [part.view_as(param) for part, param in
                                             zip(update.split(sizes), surgery_params)])
                self._synchronized = surgery_params
        return self.diagnostics(tasks, gram, weights)

    def synchronized_parameters(self) -> list[nn.Parameter]:
        return self._synchronized

    def _surgery_buckets(self, weighted: Mapping[str, Tensor], params: Sequence[nn.Parameter],
                         own: Mapping[str, Sequence[nn.Parameter]],
                         retain_graph: bool) -> tuple[list[nn.Parameter], list[Tensor]]:
        """Per-task gradients of ``params`` (and ``own`` params, accumulated directly): the parameters reached by
        several tasks and their stacked gradients [T, *shape]; a parameter only one task reached gets that task's
        gradient at once."""
        tasks = list(weighted)
        surgery_params, buckets = [], []

        def add(param: nn.Parameter, stacked: Tensor, reached: list[int]) -> None:
            if len(reached) == 1:  # only one task's loss reached it: that task's own parameter this step
                _accumulate([param], [stacked[reached[0]]])
            elif reached:
                surgery_params.append(param)
                buckets.append(stacked)

        if self.per_task_grads == 'batched':
            own_params = [p for task in tasks for p in own[task]]
            eye = torch.eye(len(tasks), device=weighted[tasks[0]].device)
            grads = torch.autograd.grad(torch.stack([weighted[task] for task in tasks]), list(params) + own_params,
                                        grad_outputs=eye, is_grads_batched=True, retain_graph=retain_graph,
                                        allow_unused=True)
            offset = len(params)
            for row, task in enumerate(tasks):
                _accumulate(own[task], [None if g is None else g[row] for g in grads[offset:offset + len(own[task])]])
                offset += len(own[task])
            # a task that does not reach a parameter has a zero row, not None: which tasks reached each one, read
            # back once for all of them
            stacked = [(param, grad) for param, grad in zip(params, grads[:len(params)]) if grad is not None]
            if stacked:
                reached = torch.stack([grad.flatten(1).any(dim=1) for _, grad in stacked]).tolist()
                for (param, grad), rows in zip(stacked, reached):
                    add(param, grad, [row for row, hit in enumerate(rows) if hit])
            return surgery_params, buckets
        per_task = []
        for task in tasks:
            grads = torch.autograd.grad(weighted[task], list(params) + list(own[task]),
                                        retain_graph=retain_graph or task != tasks[-1], allow_unused=True)
            per_task.append(list(grads[:len(params)]))
            _accumulate(own[task], grads[len(params):])
        for index, param in enumerate(params):
            grads = [task_grads[index] for task_grads in per_task]
            for task_grads in per_task:  # stacked below: drop the loose copy, so G is held once, not twice
                task_grads[index] = None
            reached = [row for row, grad in enumerate(grads) if grad is not None]
            if reached:
                add(param, torch.stack([torch.zeros_like(param) if g is None else g for g in grads]), reached)
        return surgery_params, buckets

    def _chunked_gram(self, weighted: Mapping[str, Tensor], shared: Sequence[nn.Parameter],
                      own: Mapping[str, Sequence[nn.Parameter]]) -> tuple[Tensor, list[nn.Parameter]]:
        """``K`` accumulated over ``gram_chunks`` groups of the shared parameters, holding one group's ``G`` at a
        time; the graph is kept for the weighted backward. Returns ``K`` and the parameters left to the surgery."""
        tasks = list(weighted)
        gram = None
        surgery_params = []
        for index, group in enumerate(_split_by_size(shared, self.gram_chunks)):
            group_own = own if index == 0 else {task: [] for task in tasks}  # heads: once, with the first group
            params, buckets = self._surgery_buckets(weighted, group, group_own, retain_graph=True)
            if buckets and rank_and_world()[1] > 1:  # this rank's block of the mean over the ranks: the blocks'
                buckets = [mean_shard_over_ranks(buckets)]  # Gram matrices sum to K
            if buckets:
                block = gram_from_gradients(buckets)
                gram = block if gram is None else gram + block.to(gram.device)
            surgery_params += params
            del buckets
        if gram is None:
            gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
        return sum_over_ranks(gram).cpu(), surgery_params  # the step's one read back

    def _feature_gram(self, weighted: Mapping[str, Tensor], own: Mapping[str, Sequence[nn.Parameter]],
                      features: Mapping[str, Any] | None) -> Tensor:
        """``K`` of the gradients with respect to the representation tensors in ``features`` (a tensor reached by
        several tasks, passed under each, gives cross terms); the heads get their own task's gradient."""
        tasks = list(weighted)
        missing = [task for task in tasks if features is None or task not in features]
        if missing:
            raise ValueError(f"{type(self).__name__}(level='feature') needs the shared representation of every task "
                             f"of the step; missing for {missing}")
        # by tensor identity (the outputs stay alive in ``features``): tasks that share an output tensor share its rows
        reached: dict[int, dict[int, Tensor]] = {}
        for row, task in enumerate(tasks):
            outputs = [t for t in _representation_tensors(features[task]) if t.requires_grad]
            if not outputs:
                raise ValueError(f"{type(self).__name__}(level='feature'): the representation of task {task!r} has "
                                 f"no tensor that requires grad")
            grads = torch.autograd.grad(weighted[task], outputs + list(own[task]), retain_graph=True,
                                        allow_unused=True)
            _accumulate(own[task], grads[len(outputs):])
            for output, grad in zip(outputs, grads[:len(outputs)]):
                if grad is not None:
                    reached.setdefault(id(output), {})[row] = grad
        gram = None
        for rows in reached.values():
            block = gram_from_gradients([torch.stack(list(rows.values()))])
            if gram is None:
                gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64, device=block.device)
            index = torch.tensor(list(rows)).to(block.device, non_blocking=True)
            gram[index.unsqueeze(1), index.unsqueeze(0)] += block
        if gram is None:
            gram = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)
        average_over_ranks([gram])
        return gram.cpu()  # the step's one read back

    def diagnostics(self, tasks: Sequence[str], gram: Tensor, weights: Tensor) -> dict:
        """Scalars for the log: per task the gradient norm and weight, pairwise cosines, the update's norm, and
        the Gram matrix's rank and smallest kept eigenvalue."""
        stats = gram_diagnostics(gram)
        scalars = {'surgery/rank': stats['rank'], 'surgery/min_eigenvalue': stats['min_eigenvalue']}
        for i, task in enumerate(tasks):
            scalars[f'surgery/norm/{task}'] = float(stats['norms'][i])
            scalars[f'surgery/weight/{task}'] = float(weights[i])
            for j in range(i + 1, len(tasks)):
                scalars[f'surgery/cosine/{task}-{tasks[j]}'] = float(stats['cosines'][i, j])
        weights64, gram64 = weights.to('cpu', torch.float64), gram.to('cpu', torch.float64)
        update = weights64 @ gram64 @ weights64  # ||w^T G||^2 = w^T K w
        scalars['surgery/norm/update'] = float(update.clamp(min=0).sqrt()) if torch.isfinite(update) else float('nan')
        return scalars


def _accumulate(params: Sequence[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
    for param, grad in zip(params, grads):
        if grad is not None:
            param.grad = grad.detach() if param.grad is None else param.grad + grad


def _weighted_backward(weighted: Mapping[str, Tensor], weights: Tensor, params: Sequence[nn.Parameter]) -> None:
    """``.grad += d(sum_t w_t L_t) / d params``: ``w^T G`` for ``params`` in one backward (frees the graph)."""
    losses = list(weighted.values())
    total = sum(weight.to(loss.dtype) * loss
                for weight, loss in zip(weights.to(losses[0].device, non_blocking=True), losses))
    if params:
        torch.autograd.backward(total, inputs=list(params))


def _split_by_size(params: Sequence[nn.Parameter], num_groups: int) -> list[list[nn.Parameter]]:
    """``params`` in order, cut into at most ``num_groups`` consecutive groups of about equal element counts."""
    total = sum(p.numel() for p in params)
    groups, current, filled = [], [], 0
    for param in params:
        current.append(param)
        filled += param.numel()
        if filled >= total * (len(groups) + 1) / num_groups and len(groups) < num_groups - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _representation_tensors(features: Any) -> list[Tensor]:
    """The floating-point tensors of a task's representation: a tensor, an object's ``representation()`` (a
    ``BackboneOutput``), or a list, tuple or mapping of those."""
    if isinstance(features, Tensor):
        return [features] if features.is_floating_point() else []
    if callable(getattr(features, 'representation', None)):
        return _representation_tensors(features.representation())
    if isinstance(features, Mapping):
        return [t for value in features.values() for t in _representation_tensors(value)]
    if isinstance(features, (list, tuple)):
        return [t for value in features for t in _representation_tensors(value)]
    return []


@AGGREGATORS.register_module()
class PCGrad(GradientSurgery):
    """PCGrad (Yu et al. 2020): each task's gradient, in a random order of the other tasks, loses its projection on
    every original gradient it conflicts with; the results are summed (``reduction='sum'``, the paper's) or
    averaged. The orders come from a generator seeded with ``seed``, saved in checkpoints. ``surgery`` keywords
    (``level``, ``per_task_grads``, ``gram_chunks``) are :class:`GradientSurgery`'s."""

    def __init__(self, loss_weights: Mapping[str, float], reduction: str = 'sum', seed: int = 0, **surgery):
        super().__init__(loss_weights, **surgery)
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

    ``surgery`` keywords (``level``, ``per_task_grads``, ``gram_chunks``) are :class:`GradientSurgery`'s.
    """

    def __init__(self, loss_weights: Mapping[str, float], scale_mode: str = 'min',
                 preference: Mapping[str, float] | None = None, tolerance: float | None = None, **surgery):
        super().__init__(loss_weights, **surgery)
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


@AGGREGATORS.register_module()
class AlignedMTLUB(AlignedMTL):
    """Aligned-MTL-UB: :class:`AlignedMTL` on the gradients with respect to the shared representation
    (``level='feature'``), the paper's upper-bound variant: one backward through the backbone instead of ``T``."""

    def __init__(self, loss_weights: Mapping[str, float], scale_mode: str = 'min',
                 preference: Mapping[str, float] | None = None, tolerance: float | None = None):
        super().__init__(loss_weights, scale_mode, preference, tolerance, level='feature')
