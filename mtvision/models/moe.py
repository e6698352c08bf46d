"""Task-routed mixture-of-experts MLP: a drop-in replacement for the ``mlp`` of timm ViT and Swin blocks.

Each task routes every token to ``top_k`` of ``num_experts`` expert MLPs (fc1 -> act -> drop -> fc2, as timm's
``Mlp``), with its own router (Mod-Squad, Chen et al., CVPR 2023) or one router shared by all tasks and fed a
learned task embedding (M3ViT, Liang et al., NeurIPS 2022). timm blocks call ``block.mlp(x)`` with the tokens
only, so the task of a forward is an attribute of the layer, set for a whole model by :func:`routing_task`::

    convert_to_moe(vit.blocks, indices=range(0, len(vit.blocks), 2), num_experts=8, tasks=['cls', 'seg'])
    with routing_task(vit, 'cls'):
        loss = criterion(vit(images), targets) + 0.01 * auxiliary_losses(vit)['balance']

Conventions:

- The router computes its logits in float32 with autocast off. Top-k experts are picked from the (noisy, while
  training with ``noise_std > 0``) logits and their gates are the softmax over those k logits only (renormalised,
  as in Mixtral), so a token's gates sum to 1 and experts that a task never selects do not change its outputs.
- A token's k assignments are ranked for capacity as GShard / Switch do: every token's first choice before any
  token's second choice, tokens in order within a rank. An expert keeps its first ``ceil(capacity_factor * k * T /
  E)`` assignments (T tokens in the forward); a dropped assignment contributes zero (the block's residual carries
  the token).
- The default forward dispatches in one batch: assignments sorted by expert fill a padded ``[E, C, dim]`` buffer,
  two ``baddbmm`` with the stacked expert weights, then each token gathers its k rows back. :meth:`MoEMlp.naive_forward`
  loops over the experts instead and is kept as the reference for it.
"""
import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROUTERS = ('per_task', 'shared')
# A dispatch maps (tokens [T, dim], expert_index [T, k], gates [T, k], capacity) to (output [T, dim], kept
# assignments [k * T] in capacity rank order).
Dispatch = Callable[[Tensor, Tensor, Tensor, int | None], tuple[Tensor, Tensor]]


def load_balancing_loss(router_probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al., 2021, eq. 4), for top-k routing.

    ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of all ``T * k`` token assignments that chose expert ``e``
    (before any capacity drop, so ``sum_e f_e = 1``) and ``P_e`` the mean router probability of ``e`` over the
    ``T`` tokens. It equals 1 for perfectly balanced routing (``f_e = P_e = 1 / E``) and ``E`` when every token
    goes to one expert with probability 1. Only ``P`` carries gradient.

    Args:
        router_probs: ``[T, E]`` softmax of the router logits over all experts.
        expert_index: ``[T, k]`` experts chosen per token.
    """
    if router_probs.dim() != 2 or expert_index.dim() != 2 or expert_index.shape[0] != router_probs.shape[0]:
        raise ValueError(f'expected router_probs [T, E] and expert_index [T, k], got {tuple(router_probs.shape)} '
                         f'and {tuple(expert_index.shape)}')
    num_experts = router_probs.shape[1]
    flat = expert_index.reshape(-1)
    counts = torch.zeros(num_experts, dtype=router_probs.dtype, device=router_probs.device)
    counts = counts.index_add(0, flat, torch.ones_like(flat, dtype=router_probs.dtype))
    fraction = counts / flat.numel()
    return num_experts * (fraction * router_probs.mean(dim=0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al., 2022, eq. 5): mean over tokens of ``logsumexp(logits) ** 2``.

    It keeps the router logits small, where the softmax is not saturated and float rounding is harmless.

    Args:
        logits: ``[T, E]`` router logits (computed in float32 here whatever their dtype).
    """
    if logits.dim() != 2:
        raise ValueError(f'expected logits [T, E], got {tuple(logits.shape)}')
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def mutual_information_terms(task_probs: Tensor, task_weights: Tensor | None = None) -> Tensor:
    """Per-task terms of minus the task-expert mutual information: ``[num_tasks]``, summing to ``-MI``.

    Task ``t``'s term is ``-P(t) KL(P(e | t) || P(e))``, as ``MI = sum_t P(t) KL(P(e | t) || P(e))``; the notation
    and arguments are those of :func:`mutual_information_loss`. Splitting by task lets each task's share be logged
    and weighted with that task's losses (``P(e)`` still mixes all tasks, so each term has gradient for every row).
    """
    if task_probs.dim() != 2:
        raise ValueError(f'expected task_probs [num_tasks, E], got {tuple(task_probs.shape)}')
    num_tasks = task_probs.shape[0]
    probs = task_probs.float()
    if task_weights is None:
        p_task = probs.new_full((num_tasks,), 1.0 / num_tasks)
    else:
        if task_weights.shape != (num_tasks,) or bool((task_weights < 0).any()) or not bool(task_weights.sum() > 0):
            raise ValueError(f'task_weights must be {num_tasks} non-negative numbers with a positive sum, '
                             f'got {task_weights.tolist()}')
        p_task = task_weights.float() / task_weights.float().sum()
    joint = p_task[:, None] * probs
    p_expert = joint.sum(dim=0)
    # log(P(t, e) / (P(t) P(e))) = log P(e | t) - log P(e); xlogy makes the P(t, e) = 0 terms exactly 0
    return -(torch.special.xlogy(joint, probs) - torch.special.xlogy(joint, p_expert[None])).sum(dim=1)


def mutual_information_loss(task_probs: Tensor, task_weights: Tensor | None = None) -> Tensor:
    """Minus the mutual information between task and expert (Mod-Squad, Chen et al., CVPR 2023).

    ``P(t, e) = P(t) P(e | t)`` with ``P(e | t)`` the rows of ``task_probs`` and ``P(t)`` uniform, or proportional to
    ``task_weights``; ``MI = sum_{t, e} P(t, e) log(P(t, e) / (P(t) P(e)))``, ``P(e) = sum_t P(t, e)``, and terms
    with ``P(t, e) = 0`` count 0. Minimising the returned ``-MI`` makes each task use few experts (low ``H(E | T)``)
    while the tasks together use all of them (high ``H(E)``). Its minimum is ``-log(num_tasks)`` under uniform
    ``P(t)``, reached when every task has experts of its own.

    Args:
        task_probs: ``[num_tasks, E]``, each row a distribution over experts (a task's mean router probabilities,
            ``MoEMlp.last_aux['probs']``).
        task_weights: ``[num_tasks]`` non-negative weights for ``P(t)``, e.g. the tasks' token counts.
    """
    return mutual_information_terms(task_probs, task_weights).sum()


def experts_used(usage_row: Tensor, threshold: float) -> Tensor:
    """Experts whose share of a task's token assignments is above ``threshold`` (Mod-Squad prunes by usage).

    Args:
        usage_row: ``[E]`` assignment counts of one task (a row of ``pop_statistics()['usage']``).
        threshold: minimum share in ``[0, 1)``; 0 keeps every expert the task routed at least one token to.

    Returns:
        Bool ``[E]``, the ``keep`` argument of :meth:`MoEMlp.extract`.
    """
    if usage_row.dim() != 1:
        raise ValueError(f'expected usage_row [E], got {tuple(usage_row.shape)}')
    if not 0 <= threshold < 1:
        raise ValueError(f'threshold must be in [0, 1), got {threshold}')
    total = usage_row.sum()
    if not total > 0:
        raise ValueError('usage_row counts no assignment: run forwards on the task before choosing its experts')
    return usage_row / total > threshold


class MoEMlp(nn.Module):
    """Mixture-of-experts MLP routed per task; replaces a timm ``Mlp`` (``[..., dim] -> [..., dim]``).

    Args:
        dim: token width (input and output).
        hidden_dim: hidden width of each expert.
        num_experts: number of experts ``E``.
        tasks: task names; the layer routes for ``self.task``, which must be one of them.
        top_k: experts per token.
        router: ``'per_task'`` (a linear router per task, Mod-Squad) or ``'shared'`` (one linear router whose input
            is the token plus a learned embedding of the task, M3ViT).
        noise_std: standard deviation of the Gaussian noise added to the router logits in training mode before the
            top-k choice (noisy top-k gating, Shazeer et al., 2017); 0 disables it.
        capacity_factor: each expert takes at most ``ceil(capacity_factor * top_k * T / E)`` assignments; None for
            no limit. With a limit the batched forward pads every expert to its capacity (at most ``T``), a size
            known on the host: the step reads nothing back from the device. Without one the buffer is sized to the
            busiest expert, which costs one device-to-host read per layer and forward.
        act_layer: activation between the two linear maps of each expert.
        drop: dropout after the activation and on the output, as timm's ``Mlp``.

    Expert weights are stacked: ``w1 [E, dim, hidden]``, ``b1 [E, hidden]``, ``w2 [E, hidden, dim]``, ``b2 [E, dim]``
    (``x @ w1``: the transpose of ``nn.Linear.weight``), initialised as ``nn.Linear`` (uniform in
    ``+-1 / sqrt(fan_in)``). Routers start from a truncated normal of std ``sqrt(0.1 / dim)`` (Switch Transformer's
    reduced initialisation) and zero bias, not from zero: zero weights tie every logit, and ``topk`` would then
    send every token to the same lowest-index experts, leaving the others without gradient until the router moves.
    Small weights spread tokens across experts from the first step with gates close to uniform.

    Each forward sets ``last_aux`` (differentiable, for the current task): ``balance``
    (:func:`load_balancing_loss`), ``z_loss`` (:func:`router_z_loss`, on the logits before noise) and ``probs``
    (``[E]`` mean router probability, for :func:`mutual_information_loss` across tasks); and adds the task's
    kept assignments per expert, dropped and total assignments to buffers that :meth:`pop_statistics` reads out.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, tasks: Sequence[str], top_k: int = 2,
                 router: str = 'per_task', noise_std: float = 0.0, capacity_factor: float | None = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        # sorted: a task's row in task_embed and in the statistics must not depend on the order a config lists
        # the tasks in (a config written back to text lists its keys sorted)
        tasks = (tasks,) if isinstance(tasks, str) else tuple(sorted(tasks))
        for name, value in (('dim', dim), ('hidden_dim', hidden_dim), ('num_experts', num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'{name} must be a positive integer, got {value!r}')
        if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) and t and '.' not in t
                                                                  for t in tasks):
            raise ValueError(f'tasks must be distinct non-empty names without ".", got {list(tasks)}')
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f'top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}')
        if router not in ROUTERS:
            raise ValueError(f'router must be one of {ROUTERS}, got {router!r}')
        if noise_std < 0:
            raise ValueError(f'noise_std must be >= 0, got {noise_std}')
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f'capacity_factor must be > 0 or None, got {capacity_factor}')
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.tasks = tasks
        self.router_type = router
        self.noise_std = noise_std
        self.capacity_factor = capacity_factor
        self.task: str | None = None

        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)
        if router == 'per_task':
            self.routers = nn.ModuleDict({task: nn.Linear(dim, num_experts) for task in tasks})
        else:
            self.router = nn.Linear(dim, num_experts)
            self.task_embed = nn.Embedding(len(tasks), dim)
        # statistics, not state: kept out of checkpoints so that extraction and loading never depend on them
        self.register_buffer('usage', torch.zeros(len(tasks), num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer('dropped', torch.zeros(len(tasks), dtype=torch.int64), persistent=False)
        self.register_buffer('assigned', torch.zeros(len(tasks), dtype=torch.int64), persistent=False)
        self.last_aux: dict[str, Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts as ``nn.Linear`` (uniform in ``+-1/sqrt(fan_in)``), routers as in the class docstring."""
        for weight, bias, fan_in in ((self.w1, self.b1, self.dim), (self.w2, self.b2, self.hidden_dim)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)
        std = math.sqrt(0.1 / self.dim)
        for linear in (self.routers.values() if self.router_type == 'per_task' else [self.router]):
            nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(linear.bias)
        if self.router_type == 'shared':
            nn.init.trunc_normal_(self.task_embed.weight, std=0.02)  # timm's token initialisation

    # ---------------------------------------------------------------------------------------------------- routing
    def _task_index(self) -> int:
        if self.task is None or self.task not in self.tasks:
            raise ValueError(f'MoEMlp task is {self.task!r}; set it to one of the known tasks {list(self.tasks)} '
                             f'(e.g. with routing_task(model, task)) before the forward')
        return self.tasks.index(self.task)

    def router_logits(self, tokens: Tensor, task_index: int) -> Tensor:
        """Float32 router logits ``[T, E]`` of ``tokens`` ``[T, dim]`` for the task at ``task_index``."""
        # the softmax and top-k over near-equal logits are sensitive to rounding: keep them out of autocast
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            tokens = tokens.float()
            if self.router_type == 'per_task':
                linear = self.routers[self.tasks[task_index]]
            else:
                linear = self.router
                tokens = tokens + self.task_embed.weight[task_index].float()
            return F.linear(tokens, linear.weight.float(), linear.bias.float())

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert takes in a forward over ``num_tokens`` tokens (None: no limit)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * self.top_k * num_tokens / self.num_experts)

    # ---------------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[..., dim]`` -> ``[..., dim]``, routed for ``self.task``, experts run as one batch."""
        return self._forward(x, self._dispatch_batched)

    def naive_forward(self, x: Tensor) -> Tensor:
        """The same computation as :meth:`forward` with a Python loop over experts: the reference for it."""
        return self._forward(x, self._dispatch_naive)

    def _forward(self, x: Tensor, dispatch: Dispatch) -> Tensor:
        task_index = self._task_index()
        if x.shape[-1] != self.dim:
            raise ValueError(f'expected tokens of width {self.dim}, got shape {tuple(x.shape)}')
        tokens = x.reshape(-1, self.dim)
        logits = self.router_logits(tokens, task_index)
        routing_logits = logits
        if self.training and self.noise_std > 0:
            routing_logits = logits + torch.randn_like(logits) * self.noise_std
        top_logits, expert_index = routing_logits.topk(self.top_k, dim=-1)
        gates = top_logits.softmax(dim=-1)
        out, kept = dispatch(tokens, expert_index, gates, self.capacity(tokens.shape[0]))
        self._record(task_index, logits, expert_index, kept)
        return self.drop2(out).reshape(x.shape)

    def _experts(self, x: Tensor, expert: int | slice) -> Tensor:
        """Expert MLP on ``x``: ``[T, dim]`` with an expert index, ``[E, C, dim]`` with a slice of all of them."""
        if isinstance(expert, int):
            hidden = torch.addmm(self.b1[expert], x, self.w1[expert])
            return torch.addmm(self.b2[expert], self.drop1(self.act(hidden)), self.w2[expert])
        hidden = torch.baddbmm(self.b1[:, None], x, self.w1)
        return torch.baddbmm(self.b2[:, None], self.drop1(self.act(hidden)), self.w2)

    def _dispatch_batched(self, tokens: Tensor, expert_index: Tensor, gates: Tensor,
                          capacity: int | None) -> tuple[Tensor, Tensor]:
        num_tokens, dim = tokens.shape
        num_experts, k = self.num_experts, self.top_k
        # assignments in capacity rank order: all first choices (token order), then all second choices, ...
        flat_expert = expert_index.t().reshape(-1)
        num_assignments = flat_expert.numel()
        # a stable sort keeps the rank order within each expert, so an assignment's place in its expert's queue
        # is its sorted position minus the number of assignments to lower-index experts
        sorted_expert, order = torch.sort(flat_expert, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.long, device=tokens.device)
        counts = counts.index_add(0, flat_expert, torch.ones_like(flat_expert))
        starts = counts.cumsum(0) - counts
        sorted_place = torch.arange(num_assignments, device=tokens.device) - starts[sorted_expert]
        place = torch.empty_like(sorted_place).scatter(0, order, sorted_place)
        # a buffer size known on the host (GShard's fixed capacity) needs no device-to-host read of the counts
        if capacity is None:
            # every assignment kept: the buffer is sized to the busiest expert, read back from the device (one
            # sync per layer). A size known on the host without it would be num_tokens (top-k picks distinct
            # experts), E / k times the expert FLOPs of the routed tokens: measured on a GPU, 2.7x the dense step
            # against 1.3x for the FLOPs routed
            slots = int(counts.max()) if num_assignments else 0
            kept = torch.ones_like(flat_expert, dtype=torch.bool)
        else:
            slots = min(capacity, num_tokens)
            kept = place < capacity
        slot = flat_expert * slots + place
        # dropped assignments are written to one spare row past the buffer (no data-dependent shapes, so no
        # device-to-host read) and read back from row 0 with weight 0
        write_slot = torch.where(kept, slot, num_experts * slots)
        buffer = tokens.new_zeros(num_experts * slots + 1, dim).index_copy(0, write_slot, tokens.repeat(k, 1))
        expert_in = buffer[:-1].view(num_experts, slots, dim)
        expert_out = self._experts(expert_in, slice(None)).reshape(-1, dim)
        weight = (gates.t().reshape(-1) * kept).to(expert_out.dtype)
        rows = expert_out.index_select(0, torch.where(kept, slot, 0)) * weight[:, None]
        return rows.view(k, num_tokens, dim).sum(dim=0), kept

    def _dispatch_naive(self, tokens: Tensor, expert_index: Tensor, gates: Tensor,
                        capacity: int | None) -> tuple[Tensor, Tensor]:
        num_tokens = tokens.shape[0]
        flat_expert = expert_index.t().reshape(-1)
        flat_token = torch.arange(num_tokens, device=tokens.device).repeat(self.top_k)
        flat_gate = gates.t().reshape(-1)
        kept = torch.zeros_like(flat_expert, dtype=torch.bool)
        out = None
        for expert in range(self.num_experts):
            assignments = (flat_expert == expert).nonzero().squeeze(1)  # ascending: capacity rank order
            if capacity is not None:
                assignments = assignments[:capacity]
            kept[assignments] = True
            token_ids = flat_token[assignments]
            y = self._experts(tokens.index_select(0, token_ids), expert)
            y = y * flat_gate[assignments, None].to(y.dtype)
            out = y.new_zeros(num_tokens, self.dim) if out is None else out
            out = out.index_add(0, token_ids, y)
        return out, kept

    def _record(self, task_index: int, logits: Tensor, expert_index: Tensor, kept: Tensor) -> None:
        probs = logits.softmax(dim=-1)
        self.last_aux = dict(balance=load_balancing_loss(probs, expert_index), z_loss=router_z_loss(logits),
                             probs=probs.mean(dim=0))
        with torch.no_grad():
            flat_expert = expert_index.t().reshape(-1)
            self.usage[task_index] += torch.zeros_like(self.usage[task_index]).index_add(
                0, flat_expert, kept.to(self.usage.dtype))
            self.dropped[task_index] += (~kept).sum()
            self.assigned[task_index] += kept.numel()

    # ------------------------------------------------------------------------------------------------- statistics
    def pop_statistics(self) -> dict[str, object]:
        """Statistics since the last call, on the CPU, then zeroes them.

        Returns:
            ``tasks``: the row order; ``usage``: float64 ``[num_tasks, E]`` kept assignments per expert;
            ``dropped`` and ``assigned``: int64 ``[num_tasks]`` dropped and total assignments (``usage`` rows sum
            to ``assigned - dropped``).
        """
        return pop_layer_statistics([self])[0]

    # --------------------------------------------------------------------------------------- extraction, upcycling
    def extract(self, task: str, keep: Tensor) -> 'MoEMlp':
        """A layer for ``task`` alone with only the experts where ``keep`` (bool ``[E]``) is true.

        Its router is ``task``'s, restricted to the kept experts (the shared router keeps the task's embedding).
        ``capacity_factor`` is scaled by ``kept / E`` so each kept expert keeps its capacity (up to float rounding
        of the ceiling). If ``keep`` holds every expert the task routes to, the top-k choice and the renormalised
        gates are unchanged and so are the outputs on that task (in eval mode, without noise).
        """
        if task not in self.tasks:
            raise ValueError(f'unknown task {task!r}; known tasks: {list(self.tasks)}')
        keep = torch.as_tensor(keep, device=self.w1.device)
        if keep.dtype != torch.bool or keep.shape != (self.num_experts,):
            raise ValueError(f'keep must be a bool tensor of shape [{self.num_experts}], got {keep.dtype} '
                             f'{tuple(keep.shape)}')
        num_kept = int(keep.sum())
        if num_kept < self.top_k:
            raise ValueError(f'keep selects {num_kept} experts, fewer than top_k={self.top_k}')
        capacity_factor = None if self.capacity_factor is None else self.capacity_factor * num_kept / self.num_experts
        layer = MoEMlp(self.dim, self.hidden_dim, num_kept, [task], top_k=self.top_k, router=self.router_type,
                       noise_std=self.noise_std, capacity_factor=capacity_factor,
                       act_layer=partial(copy.deepcopy, self.act), drop=self.drop1.p)
        layer.to(device=self.w1.device, dtype=self.w1.dtype)
        index = self.tasks.index(task)
        with torch.no_grad():
            for name in ('w1', 'b1', 'w2', 'b2'):
                getattr(layer, name).copy_(getattr(self, name)[keep])
            if self.router_type == 'per_task':
                source, target = self.routers[task], layer.routers[task]
            else:
                source, target = self.router, layer.router
                layer.task_embed.weight.copy_(self.task_embed.weight[index:index + 1])
            target.weight.copy_(source.weight[keep])
            target.bias.copy_(source.bias[keep])
        layer.task = task
        layer.train(self.training)
        return layer

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int, tasks: Sequence[str], **kwargs) -> 'MoEMlp':
        """Sparse upcycling (Komatsuzaki et al., ICLR 2023): every expert a copy of the dense timm ``Mlp``.

        The routers are fresh. As a token's gates sum to 1, the layer computes the dense MLP's function (up to
        float rounding) until training makes the experts differ. ``act_layer`` and ``drop`` default to the dense
        MLP's; ``hidden_dim``, if given, must be its hidden width.
        """
        fc1, fc2 = getattr(mlp, 'fc1', None), getattr(mlp, 'fc2', None)
        if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
            raise TypeError(f'expected a timm Mlp with nn.Linear fc1 and fc2, got {type(mlp).__name__}')
        if not isinstance(getattr(mlp, 'norm', nn.Identity()), nn.Identity):
            raise ValueError(f'cannot upcycle an Mlp with a hidden norm ({type(mlp.norm).__name__})')
        dim, hidden_dim = fc1.in_features, fc1.out_features
        if fc2.in_features != hidden_dim or fc2.out_features != dim:
            raise ValueError(f'cannot upcycle an Mlp mapping {dim} -> {hidden_dim} -> {fc2.out_features}: an expert '
                             f'maps dim -> hidden_dim -> dim')
        if kwargs.setdefault('hidden_dim', hidden_dim) != hidden_dim:
            raise ValueError(f'hidden_dim={kwargs["hidden_dim"]} differs from the dense MLP hidden width '
                             f'{hidden_dim}; upcycling copies its weights')
        if 'act_layer' not in kwargs and hasattr(mlp, 'act'):
            kwargs['act_layer'] = partial(copy.deepcopy, mlp.act)
        if 'drop' not in kwargs and isinstance(getattr(mlp, 'drop1', None), nn.Dropout):
            kwargs['drop'] = mlp.drop1.p
        layer = cls(dim, num_experts=num_experts, tasks=tasks, **kwargs)
        layer.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        with torch.no_grad():
            layer.w1.copy_(fc1.weight.t().expand_as(layer.w1))
            layer.w2.copy_(fc2.weight.t().expand_as(layer.w2))
            for bias, dense in ((layer.b1, fc1.bias), (layer.b2, fc2.bias)):
                if dense is None:
                    bias.zero_()
                else:
                    bias.copy_(dense.expand_as(bias))
        return layer

    def __getstate__(self) -> dict:
        # last_aux holds non-leaf tensors of the last graph, which deepcopy and pickle refuse; a copy starts
        # without them (e.g. a momentum or EMA copy of a backbone taken after a forward)
        state = super().__getstate__()
        state['last_aux'] = None
        return state

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this layer) that AdamW should not decay.

        The stacked expert biases are 2-D, so a "decay every parameter with ndim >= 2" rule would decay them.
        """
        names = {'b1', 'b2'}
        if self.router_type == 'shared':
            names.add('task_embed.weight')
        return names

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, top_k={self.top_k}, '
                f'router={self.router_type!r}, tasks={list(self.tasks)}, noise_std={self.noise_std}, '
                f'capacity_factor={self.capacity_factor}')


# -------------------------------------------------------------------------------------------------- model helpers
def pop_layer_statistics(layers: Sequence[MoEMlp]) -> list[dict[str, object]]:
    """:meth:`MoEMlp.pop_statistics` of every layer, read back from the device in one copy (one sync, not three
    per layer). The counts are exact: float64 holds integers up to 2^53."""
    if not layers:
        return []
    with torch.no_grad():
        packed = torch.cat([torch.cat([layer.usage.flatten(), layer.dropped.double(), layer.assigned.double()])
                            for layer in layers]).cpu()
    stats, offset = [], 0
    for layer in layers:
        num_tasks, num_experts = layer.usage.shape
        usage, dropped, assigned = packed[offset:offset + num_tasks * (num_experts + 2)].split(
            [num_tasks * num_experts, num_tasks, num_tasks])
        offset += num_tasks * (num_experts + 2)
        stats.append(dict(tasks=list(layer.tasks), usage=usage.reshape(num_tasks, num_experts).clone(),
                          dropped=dropped.long(), assigned=assigned.long()))
        layer.usage.zero_()
        layer.dropped.zero_()
        layer.assigned.zero_()
    return stats


def routing_scalars(statistics: dict[str, dict], prefix: str) -> dict[str, float]:
    """Scalars of ``MultiTaskModel.expert_statistics()``: per layer and task the share of each expert
    (``{prefix}/{layer}/{task}/expert_{e}``), and per task the share of dropped assignments over all layers."""
    scalars, dropped, assigned = {}, {}, {}
    for layer, stats in statistics.items():
        for row, task in enumerate(stats['tasks']):
            kept = stats['usage'][row]
            if kept.sum() > 0:
                shares = kept / kept.sum()
                scalars.update({f'{prefix}/{layer}/{task}/expert_{e}': float(v) for e, v in enumerate(shares)})
            dropped[task] = dropped.get(task, 0) + int(stats['dropped'][row])
            assigned[task] = assigned.get(task, 0) + int(stats['assigned'][row])
    scalars.update({f'{prefix}/dropped/{task}': dropped[task] / assigned[task] for task in assigned if assigned[task]})
    return scalars


def moe_layers(module: nn.Module) -> list[tuple[str, MoEMlp]]:
    """Every :class:`MoEMlp` inside ``module`` (itself included), with its qualified name."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoEMlp)]


@contextmanager
def routing_task(module: nn.Module, task: str) -> Iterator[None]:
    """Sets ``.task`` on every :class:`MoEMlp` inside ``module`` for the ``with`` block, then restores each value."""
    layers = moe_layers(module)
    for name, layer in layers:
        if task not in layer.tasks:
            raise ValueError(f'MoE layer {name or type(module).__name__!r} does not route task {task!r}; its '
                             f'tasks are {list(layer.tasks)}')
    previous = [layer.task for _, layer in layers]
    try:
        for _, layer in layers:
            layer.task = task
        yield
    finally:
        for (_, layer), value in zip(layers, previous):
            layer.task = value


def auxiliary_losses(module: nn.Module) -> dict[str, Tensor]:
    """``balance`` and ``z_loss`` summed over the MoE layers of ``module``, from each layer's last forward.

    Read them after the forward of each task (the next forward replaces them). Empty when no layer has run.
    """
    terms = [layer.last_aux for _, layer in moe_layers(module) if layer.last_aux is not None]
    if not terms:
        return {}
    return {key: torch.stack([aux[key] for aux in terms]).sum() for key in ('balance', 'z_loss')}


def convert_to_moe(blocks: Sequence[nn.Module], indices: Sequence[int], num_experts: int, tasks: Sequence[str],
                   hidden_dim: int | None = None, upcycle: bool = True, **kwargs) -> None:
    """Replaces ``blocks[i].mlp`` (a timm ``Mlp``) by a :class:`MoEMlp` for each ``i`` in ``indices``.

    Works for ``vit.blocks`` and for Swin's ``[b for layer in swin.layers for b in layer.blocks]``. Negative
    indices count from the end. ``hidden_dim`` defaults to the dense MLP's; with ``upcycle`` every expert starts
    as a copy of the dense MLP (:meth:`MoEMlp.from_dense`), otherwise freshly initialised. ``kwargs`` go to
    :class:`MoEMlp`.
    """
    blocks = list(blocks)
    depth = len(blocks)
    bad = [i for i in indices if not -depth <= i < depth]
    if bad:
        raise IndexError(f'block indices {bad} out of range for {depth} blocks')
    if len({i % depth for i in indices}) != len(indices):
        raise ValueError(f'block indices {list(indices)} name a block twice')
    for i in indices:
        mlp = getattr(blocks[i], 'mlp', None)
        if isinstance(mlp, MoEMlp) or not isinstance(getattr(mlp, 'fc1', None), nn.Linear):
            raise TypeError(f'block {i} has no dense timm Mlp to convert (its mlp is {type(mlp).__name__})')
    for i in indices:
        mlp = blocks[i].mlp
        if upcycle:
            layer = MoEMlp.from_dense(mlp, num_experts, tasks,
                                      **({} if hidden_dim is None else dict(hidden_dim=hidden_dim)), **kwargs)
        else:
            layer = MoEMlp(mlp.fc1.in_features, hidden_dim or mlp.fc1.out_features, num_experts, tasks, **kwargs)
            layer.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        blocks[i].mlp = layer



# keys of a backbone's ``moe`` config besides ``blocks``, passed on to convert_to_moe / MoEMlp
MOE_CONFIG_KEYS = ('num_experts', 'hidden_dim', 'upcycle', 'top_k', 'router', 'noise_std', 'capacity_factor', 'drop')


def convert_blocks_to_moe(blocks: Sequence[nn.Module], moe: Mapping, tasks: Sequence[str]) -> None:
    """:func:`convert_to_moe` from a backbone's ``moe`` config dict, e.g. ``dict(blocks='every_other',
    num_experts=8, top_k=2)``.

    ``blocks`` is ``'every_other'`` (blocks 1, 3, 5, ...: the second of each pair, so an even-depth model ends with
    an MoE block, as V-MoE's "every other layer", Riquelme et al., 2021), ``'all'``, or a list of block indices
    (default ``'every_other'``). ``num_experts`` is required; the other keys are those of
    :func:`convert_to_moe` and :class:`MoEMlp`: ``hidden_dim``, ``upcycle``, ``top_k``, ``router``, ``noise_std``,
    ``capacity_factor``, ``drop``. ``num_experts`` and ``capacity_factor`` may also be lists with one value per
    selected block (what a per-task extraction writes: it keeps a different number of experts in each layer).
    """
    config = dict(moe)
    unknown = sorted(set(config) - {'blocks', *MOE_CONFIG_KEYS})
    if unknown:
        raise ValueError(f'moe: unknown keys {unknown}; known: {["blocks", *MOE_CONFIG_KEYS]}')
    if 'num_experts' not in config:
        raise ValueError(f'moe: num_experts is required, got {config}')
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError('moe: the MoE layers need the task names they route (tasks=[...]), got none')
    depth = len(blocks)
    which = config.pop('blocks', 'every_other')
    if which == 'every_other':
        indices = list(range(1, depth, 2))
    elif which == 'all':
        indices = list(range(depth))
    elif isinstance(which, Sequence) and not isinstance(which, str) and all(isinstance(i, int) for i in which):
        indices = list(which)
    else:
        raise ValueError(f"moe.blocks must be 'every_other', 'all' or a list of block indices, got {which!r}")
    if not indices:
        raise ValueError(f'moe.blocks={which!r} selects no block of {depth}')
    per_block = {}
    for key in ('num_experts', 'capacity_factor'):
        value = config.pop(key, None)
        if isinstance(value, Sequence):
            if len(value) != len(indices):
                raise ValueError(f'moe.{key} lists {len(value)} values for the {len(indices)} MoE blocks {indices}')
            per_block[key] = list(value)
        else:
            per_block[key] = [value] * len(indices)
    for index, num_experts, capacity_factor in zip(indices, per_block['num_experts'], per_block['capacity_factor']):
        convert_to_moe(blocks, [index], num_experts=num_experts, tasks=tasks, capacity_factor=capacity_factor,
                       **config)


def upcycle_state_dict(dense: Mapping[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """Weights for ``model`` (which has MoE layers) from the weights of the same model without them (sparse
    upcycling of a dense checkpoint, Komatsuzaki et al., ICLR 2023).

    For each MoE layer ``name`` of ``model`` whose dense MLP ``name.fc1.*`` / ``name.fc2.*`` is in ``dense``, every
    expert gets a copy of it and the routers keep ``model``'s own (fresh) initialisation; all other entries pass
    through. Returns the new weights and the names of the upcycled layers (empty when ``dense`` already holds MoE
    weights, which then load as they are).
    """
    weights = dict(dense)
    own = model.state_dict()
    upcycled = []
    for name, layer in moe_layers(model):
        prefix = f'{name}.' if name else ''
        if f'{prefix}fc1.weight' not in weights:
            continue
        fc1_weight, fc2_weight = weights.pop(f'{prefix}fc1.weight'), weights.pop(f'{prefix}fc2.weight')
        fc1_bias, fc2_bias = weights.pop(f'{prefix}fc1.bias', None), weights.pop(f'{prefix}fc2.bias', None)
        expected = (layer.hidden_dim, layer.dim)
        if tuple(fc1_weight.shape) != expected or tuple(fc2_weight.shape) != expected[::-1]:
            raise ValueError(f'{prefix}fc1/fc2 of shapes {tuple(fc1_weight.shape)} / {tuple(fc2_weight.shape)} do '
                             f'not fit the MoE layer {name!r} (dim {layer.dim}, hidden {layer.hidden_dim})')
        experts = layer.num_experts
        weights[f'{prefix}w1'] = fc1_weight.t().expand(experts, -1, -1).clone()
        weights[f'{prefix}w2'] = fc2_weight.t().expand(experts, -1, -1).clone()
        for key, bias, width in (('b1', fc1_bias, layer.hidden_dim), ('b2', fc2_bias, layer.dim)):
            weights[f'{prefix}{key}'] = (bias if bias is not None else fc1_weight.new_zeros(width)).expand(
                experts, -1).clone()
        for key, value in own.items():  # routers (and the shared router's task embedding) stay fresh
            if key.startswith(prefix) and key not in weights:
                weights[key] = value.clone()
        upcycled.append(name)
    return weights, upcycled


__all__ = ['MoEMlp', 'routing_scalars', 'routing_task', 'moe_layers', 'auxiliary_losses', 'convert_to_moe',
           'convert_blocks_to_moe', 'load_balancing_loss', 'router_z_loss', 'mutual_information_loss',
           'mutual_information_terms', 'experts_used', 'pop_layer_statistics', 'upcycle_state_dict']
