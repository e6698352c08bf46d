"""Learned loss weighting: uncertainty weighting (Kendall et al. 2018) and GradNorm (Chen et al. 2018).

Both are aggregators (:class:`~mtvision.optim.aggregators.Aggregator`) that are also ``nn.Module`` s: their weights
are parameters, trained by the run's optimizer in a group of their own without weight decay (:meth:`param_group`),
and saved with ``state_dict`` (tensors only, loadable with ``torch.load(weights_only=True)``).

Loss scale: the trainer may hand over the losses multiplied by a common factor ``c`` (``1 / accumulate_steps``, a
grad scaler's scale). ``backward(..., scale=c)`` says so, and the terms that are not multiples of a loss (the
uncertainty regulariser, GradNorm's loss ratios) are treated alike, so every gradient written is ``c`` times that
of the unscaled objective: the grad scaler divides it back out and accumulation sums it, as for the network.
"""
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtvision.distributed import average_over_ranks
from mtvision.optim.aggregators import Aggregator
from mtvision.registry import AGGREGATORS

__all__ = ['GradNorm', 'UncertaintyWeighting']

# GradNorm's weights stay above this (their mean is 1): a step that pushed one to zero or below would remove or
# flip its task's gradient, and no later GradNorm gradient could bring a zero weight back (G_W = w ||grad L||).
_MIN_TASK_WEIGHT = 1e-3


class _LearnedWeighting(nn.Module, Aggregator):
    """An aggregator with learnable parameters; ``nn.Module`` comes first so that its ``state_dict`` and
    ``load_state_dict`` (parameters and buffers) are the ones checkpoints use."""

    def __init__(self, loss_weights: Mapping[str, float]):
        nn.Module.__init__(self)
        Aggregator.__init__(self, loss_weights)
        if not self.loss_weights:
            raise ValueError(f'{type(self).__name__} needs at least one task in loss_weights, got {loss_weights!r}')
        bad = [task for task in self.loss_weights if not isinstance(task, str) or not task or '.' in task]
        if bad:  # the names are keys of a ParameterDict, hence of the state dict
            raise ValueError(f'{type(self).__name__}: task names must be non-empty strings without ".", got {bad}')

    def attach(self, backbone: nn.Module, device: torch.device) -> list[nn.Parameter]:
        self.to(device)
        return [p for p in self.parameters() if p.requires_grad]

    def param_group(self) -> dict:
        """The optimizer param group of these parameters: no weight decay, which would pull the weights to zero."""
        return dict(params=list(self.parameters()), weight_decay=0.0)

    def _checked_losses(self, losses: Mapping[str, Tensor], scale: float | Tensor) -> dict[str, Tensor]:
        """``loss_weight * loss`` per task of the step, after checking the losses, the scale and the device."""
        weighted = self.weighted_losses(losses)
        if not weighted:
            raise ValueError(f'{type(self).__name__}.backward got no task losses')
        if isinstance(scale, (int, float)) and not scale > 0:
            raise ValueError(f'{type(self).__name__}.backward: scale must be positive, got {scale!r}')
        device = next(self.parameters()).device
        for task, loss in losses.items():
            if loss.ndim != 0:
                raise ValueError(f'the loss of task {task!r} must be a scalar, got shape {tuple(loss.shape)}')
            if loss.device != device:
                raise RuntimeError(f'the loss of task {task!r} is on {loss.device} but the {type(self).__name__} '
                                   f'parameters are on {device}: move the aggregator to the model\'s device before '
                                   f'building the optimizer')
        return weighted


@AGGREGATORS.register_module()
class UncertaintyWeighting(_LearnedWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018), one backward pass.

    With ``s_t = log sigma_t^2`` learned per task (``log_variances``), the objective is

        ``sum_t w_t * (exp(-s_t) * L_t + s_t) / 2``

    i.e. the paper's Gaussian-likelihood form (its eq. 7, ``L / (2 sigma^2) + log sigma``) written with the log
    variance as the paper does in practice (its Sec. 3.2), for every task, as LibMTL's ``UW`` does. The paper's
    classification form ``exp(-s) L + s / 2`` is the same objective with ``s`` shifted by ``log 2``: both balance
    at an effective weight ``1 / (2 L_t)``; ``init_log_variance=-log(2)`` starts this form from weight ``w_t`` (the
    default 0 starts from ``w_t / 2``; LibMTL starts from -0.5).

    ``w_t`` is the task's ``loss_weight`` and multiplies the whole term, like a likelihood weight (as if the task's
    data were repeated ``w_t`` times), so it survives the balance: the effective weight there is ``w_t / (2 L_t)``
    (weighting ``L_t`` alone would let ``s_t`` cancel it). Tasks absent from a step contribute nothing: their
    ``s_t`` gets no gradient. Logged per task: the effective weight ``w_t exp(-s_t) / 2`` of ``L_t`` and ``s_t``.
    """

    def __init__(self, loss_weights: Mapping[str, float], init_log_variance: float = 0.0):
        super().__init__(loss_weights)
        init = torch.tensor(float(init_log_variance))
        if not torch.isfinite(init):
            raise ValueError(f'UncertaintyWeighting: init_log_variance must be finite, got {init_log_variance!r}')
        self.log_variances = nn.ParameterDict({task: nn.Parameter(init.clone()) for task in self.loss_weights})

    def backward(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter],
                 task_params: Mapping[str, Sequence[nn.Parameter]] | None = None, *,
                 scale: float | Tensor = 1.0, features: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """Write ``.grad`` of the objective for this step's ``losses`` (each multiplied by ``scale``); returns the
        log scalars as detached tensors (read back only when logged)."""
        weighted = self._checked_losses(losses, scale)
        terms, scalars = [], {}
        for task, loss in weighted.items():
            s = self.log_variances[task]
            precision = torch.exp(-s)
            # the regulariser gets the losses' scale too, so that the gradient of s_t is a multiple of the true one
            terms.append(0.5 * (precision * loss + self.loss_weights[task] * scale * s))
            scalars[f'uncertainty/weight/{task}'] = (0.5 * self.loss_weights[task] * precision).detach()
            scalars[f'uncertainty/log_variance/{task}'] = s.detach().clone()  # the optimizer updates s in place
        torch.stack(terms).sum().backward()
        return scalars


@AGGREGATORS.register_module()
class GradNorm(_LearnedWeighting):
    """GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, ICML 2018): learned task weights that balance the
    tasks' gradient norms on the last shared layer by their relative training rates.

    Per step, over the tasks present (``L_t`` = ``loss_weight * loss``; ``task_weights`` ``w_t`` start at 1):

    - ``G_t = ||grad_W (w_t L_t)||`` on the shared parameters ``W`` of the last layer, ``G_avg`` their mean;
    - ``r_t = (L_t / L_t(0)) / mean_u(L_u / L_u(0))``, ``L_t(0)`` the first finite loss seen of the task
      (``initial_losses``, kept in ``state_dict``; averaged over the ranks under torch.distributed, like the
      current losses, so every rank and a resumed run use the same ratios);
    - ``L_grad = sum_t |G_t - G_avg r_t^alpha|`` with the target held constant (as the paper, so the weights do
      not drift to zero); its gradient goes to the ``w_t`` only, the network gets the gradient of
      ``sum_t w_t L_t`` (weights detached), one backward pass plus one ``autograd.grad`` per task down to ``W``.

    Since ``G_t = w_t ||grad_W L_t||`` for ``w_t > 0``, ``dG_t / dw_t = ||grad_W L_t||`` exactly: no second-order
    graph (``create_graph``) is needed. The weights are renormalised to sum to the number of tasks ``T`` (the
    paper does so after each update; here at the start of each ``backward``, which is the same sequence of used
    weights, and ``renormalize`` does it on demand), and kept above a small floor.

    ``W`` (the paper's choice: the last shared layer):

    - ``layer=None``: the trailing shared parameters from the last one with at least two dimensions (a weight
      matrix or kernel, then its bias and any final norm; for a timm ViT the last block's ``mlp.fc2`` and the
      final ``norm``), keeping only those that every present task's loss reaches; a trailing parameter some task
      does not reach (a SimMIM mask token) is skipped and the search moves back. Resolved per set of tasks and
      cached.
    - ``layer='model.norm'``: the shared parameters whose names start with this prefix; the names come from
      :meth:`bind_names` (``model.backbone.named_parameters()``), which :meth:`attach` calls before training.

    Args:
        loss_weights: each task's static weight (its ``loss_weight``); GradNorm's weights multiply it.
        alpha: the restoring force's strength (the paper uses 0.12 to 3; 1.5 for NYUv2).
        lr_weights: the learning rate of the task weights (``param_group`` carries it); None: the optimizer's.
        layer: a parameter-name prefix for ``W``, or None for the trailing layer (above).
    """

    supports_accumulation = False  # the rates and norms of a sum of micro-batches are not the sum of theirs

    def __init__(self, loss_weights: Mapping[str, float], alpha: float = 1.5, lr_weights: float | None = None,
                 layer: str | None = None):
        super().__init__(loss_weights)
        if not alpha >= 0:
            raise ValueError(f'GradNorm: alpha must be >= 0, got {alpha!r}')
        if lr_weights is not None and not lr_weights > 0:
            raise ValueError(f'GradNorm: lr_weights must be positive or None, got {lr_weights!r}')
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ValueError(f'GradNorm: layer must be a non-empty parameter-name prefix or None, got {layer!r}')
        self.alpha = float(alpha)
        self.lr_weights = lr_weights
        self.layer = layer
        self.tasks = list(self.loss_weights)
        self.task_weights = nn.ParameterDict({task: nn.Parameter(torch.ones(())) for task in self.tasks})
        self.register_buffer('initial_losses', torch.full((len(self.tasks),), float('nan')))  # NaN: not seen yet
        self._layer_params: list[nn.Parameter] | None = None
        self._windows: dict[tuple, list[int]] = {}  # layer=None: indices of W in the shared parameters, per tasks

    def attach(self, backbone: nn.Module, device: torch.device) -> list[nn.Parameter]:
        self.bind_names(backbone.named_parameters())
        return super().attach(backbone, device)

    def param_group(self) -> dict:
        group = super().param_group()
        if self.lr_weights is not None:
            group['lr'] = self.lr_weights
        return group

    def bind_names(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> list[str]:
        """Select ``W`` by ``layer`` among the shared parameters' ``(name, parameter)`` pairs; returns the names."""
        if self.layer is None:
            return []
        named = list(named_parameters)
        chosen = [(name, p) for name, p in named if name == self.layer or name.startswith(self.layer + '.')]
        if not chosen:
            prefixes = sorted({name.rsplit('.', 1)[0] for name, _ in named})[-8:]
            raise ValueError(f'GradNorm: layer={self.layer!r} matches no shared parameter name; the last layers '
                             f'are e.g. {prefixes}')
        self._layer_params = [p for _, p in chosen]
        return [name for name, _ in chosen]

    @torch.no_grad()
    def renormalize(self) -> None:
        """Scale the task weights to sum to the number of tasks, as the paper does after each update."""
        weights = torch.stack(list(self.task_weights.values())).clamp(min=_MIN_TASK_WEIGHT)
        weights = weights * (len(weights) / weights.sum())
        for param, value in zip(self.task_weights.values(), weights):
            param.copy_(value)

    def backward(self, losses: Mapping[str, Tensor], shared_params: Sequence[nn.Parameter],
                 task_params: Mapping[str, Sequence[nn.Parameter]] | None = None, *,
                 scale: float | Tensor = 1.0, features: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """Write ``.grad`` of the network (``sum_t w_t L_t``) and of the task weights (``L_grad``) for this step's
        ``losses`` (each multiplied by ``scale``); returns the log scalars as detached tensors."""
        weighted = self._checked_losses(losses, scale)
        self.renormalize()
        tasks = list(weighted)
        shared = [p for p in shared_params if p.requires_grad]
        if not shared:
            raise ValueError('GradNorm needs trainable shared parameters: none were given')
        layer_grads = self._layer_gradients(tasks, weighted, shared)
        # the norms of the global batch's gradients: average the ranks' gradients (linear) before the norm (not)
        average_over_ranks([grad for task in tasks for grad in layer_grads[task]])
        norms = torch.stack([torch.linalg.vector_norm(torch.stack([g.norm() for g in layer_grads[t]]))
                             for t in tasks])
        weights = torch.stack([self.task_weights[t] for t in tasks])
        grad_norms = weights * norms  # G_t, differentiable in w_t only

        current = torch.stack([weighted[t].detach() for t in tasks]) / scale
        average_over_ranks([current])  # the global batch's losses
        index = torch.tensor([self.tasks.index(t) for t in tasks], device=current.device)
        with torch.no_grad():
            initial = self.initial_losses[index]
            initial = torch.where(torch.isnan(initial) & torch.isfinite(current), current, initial)
            self.initial_losses[index] = initial
        rates = current / initial
        ratios = rates / rates.mean()
        target = grad_norms.detach().mean() * ratios ** self.alpha
        gradnorm_loss = (grad_norms - target).abs().sum()
        weight_grads = torch.autograd.grad(gradnorm_loss, [self.task_weights[t] for t in tasks])
        for task, grad in zip(tasks, weight_grads):
            param = self.task_weights[task]
            param.grad = grad if param.grad is None else param.grad + grad

        total = (weights.detach() * torch.stack([weighted[t] for t in tasks])).sum()
        total.backward()

        scalars = {'gradnorm/loss': (gradnorm_loss / scale).detach()}
        for i, task in enumerate(tasks):
            scalars[f'gradnorm/weight/{task}'] = weights[i].detach()
            scalars[f'gradnorm/grad_norm/{task}'] = (grad_norms[i] / scale).detach()
            scalars[f'gradnorm/ratio/{task}'] = ratios[i]
        return scalars

    def _layer_gradients(self, tasks: list[str], weighted: dict[str, Tensor],
                         shared: list[nn.Parameter]) -> dict[str, list[Tensor]]:
        """Each task's gradient of its loss on ``W`` (the graph is kept for the network's backward)."""
        if self.layer is not None:
            if self._layer_params is None:
                raise RuntimeError(f'GradNorm(layer={self.layer!r}) needs the shared parameters\' names: call '
                                   f'attach(model.backbone, device) (or bind_names) before the first step')
            shared_ids = {id(p) for p in shared}
            params = [p for p in self._layer_params if p.requires_grad]
            if not params or any(id(p) not in shared_ids for p in params):
                raise ValueError(f'GradNorm: the parameters of layer={self.layer!r} are not trainable shared '
                                 f'parameters of this step')
            grads = self._gradients(tasks, weighted, params)
            unreached = [t for t in tasks if all(g is None for g in grads[t])]
            if unreached:
                raise ValueError(f'GradNorm: the losses of tasks {unreached} do not reach layer={self.layer!r}')
            # a parameter of the layer that a task does not reach (an unused expert) is a zero gradient
            return {t: [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[t])] for t in tasks}

        key = (frozenset(tasks), len(shared))
        if key in self._windows:
            params = [shared[i] for i in self._windows[key]]
            grads = self._gradients(tasks, weighted, params)
            if all(g is not None for t in tasks for g in grads[t]):
                return grads
        end = len(shared)
        while True:  # move back from the end until every task reaches a matrix-shaped parameter
            start = next((i for i in range(end - 1, -1, -1) if shared[i].ndim >= 2), None)
            if start is None:
                raise ValueError(f'GradNorm: no shared parameter with at least two dimensions is reached by the '
                                 f'losses of every task of the step {tasks}; name the layer (layer=...)')
            window = shared[start:]
            grads = self._gradients(tasks, weighted, window)
            keep = [i for i in range(len(window)) if all(grads[t][i] is not None for t in tasks)]
            if keep and keep[0] == 0:
                self._windows[key] = [start + i for i in keep]
                return {t: [grads[t][i] for i in keep] for t in tasks}
            end = start

    @staticmethod
    def _gradients(tasks: list[str], weighted: dict[str, Tensor],
                   params: list[nn.Parameter]) -> dict[str, tuple[Tensor | None, ...]]:
        return {t: torch.autograd.grad(weighted[t], params, retain_graph=True, allow_unused=True) for t in tasks}
