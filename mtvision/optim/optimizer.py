"""Optimizer with parameter groups, and the iteration-based learning-rate schedule."""
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

OPTIMIZERS = {'AdamW': torch.optim.AdamW, 'Adam': torch.optim.Adam, 'SGD': torch.optim.SGD}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the parameters weight decay should not shrink.

    Norm scales and biases (every tensor of one dimension or less) and the names the model lists in
    ``no_weight_decay()`` (position embeddings, class token) get no decay, as in timm and MAE.
    """
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def build_optimizer(model: nn.Module, optimizer_cfg: dict) -> torch.optim.Optimizer:
    """``optimizer_cfg`` is ``optim_wrapper.optimizer`` of the config, e.g. ``dict(type='AdamW', lr=1e-3)``.

    ``fused`` (default None): None uses torch's fused kernels (one kernel per step for all parameters) when every
    trained parameter is a CUDA tensor and torch's default otherwise (``foreach``); True or False as torch's
    argument (True works on CPU too, with torch's CPU kernel).
    """
    cfg = dict(optimizer_cfg)
    kind = cfg.pop('type', 'AdamW')
    if kind not in OPTIMIZERS:
        raise KeyError(f'optim_wrapper.optimizer.type={kind!r} is not one of {sorted(OPTIMIZERS)}')
    weight_decay = cfg.pop('weight_decay', 0.0)
    groups = param_groups(model, weight_decay)
    if cfg.get('fused') is None and not cfg.get('foreach'):
        params = [param for group in groups for param in group['params']]
        on_cuda = bool(params) and all(param.is_cuda and param.is_floating_point() for param in params)
        cfg['fused'] = True if on_cuda else None
    try:
        return OPTIMIZERS[kind](groups, **cfg)
    except (TypeError, RuntimeError, ValueError) as error:
        raise type(error)(f'optim_wrapper.optimizer: {error}') from error


def match_parameter_layouts(params: Sequence[nn.Parameter]) -> None:
    """Give each ``.grad`` its parameter's strides where they differ. Autograd may lay out the gradient of a
    parameter with size-1 dimensions otherwise (a 1x1 convolution's weight gets channels-last strides), and torch's
    fused optimizer kernels refuse such a pair on CUDA (pytorch/pytorch#106951)."""
    for param in params:
        if param.grad is not None and param.grad.stride() != param.stride():
            param.grad = torch.empty_like(param).copy_(param.grad)


AUTO_SCALE_LR_KEYS = {'base_batch_size', 'enable', 'task'}


def auto_scaled_lr(optimizer_cfg: Mapping, auto_scale_lr: Mapping | None, world_size: int,
                   batch_sizes: Mapping[str, int], accumulate_steps: int = 1) -> tuple[float, str]:
    """The learning rate of ``optimizer_cfg`` scaled to this run's global batch, and a line saying so for the log.

    mmengine's ``auto_scale_lr = dict(base_batch_size=512, enable=True)``: the config's ``lr`` is the one of a global
    batch of ``base_batch_size``, and a run with another global batch (``world_size`` GPUs x the per-GPU batch x
    ``accumulate_steps``) multiplies it by their ratio, the linear scaling rule of Goyal et al. (2017, "Accurate,
    Large Minibatch SGD"). With several tasks ``task`` names the one whose batch the base refers to (the recipe's
    file name states it, e.g. ``8xb64``); it may be omitted when every task has the same batch.

    Args:
        optimizer_cfg: ``optim_wrapper.optimizer``, with ``lr``.
        auto_scale_lr: the config's ``auto_scale_lr``; None or ``enable=False`` keeps ``lr``.
        world_size: data-parallel processes.
        batch_sizes: ``{task: batch per GPU}``.
        accumulate_steps: micro-batches per update (``train_cfg.accumulate_steps``).
    """
    lr = optimizer_cfg.get('lr')
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ValueError(f'optim_wrapper.optimizer.lr must be a positive number, got {lr!r}')
    cfg = dict(auto_scale_lr or {})
    unknown = set(cfg) - AUTO_SCALE_LR_KEYS
    if unknown:
        raise KeyError(f'auto_scale_lr has unknown keys {sorted(unknown)}; known: {sorted(AUTO_SCALE_LR_KEYS)}')
    if not cfg.get('enable', False):
        return lr, f'auto_scale_lr: off, lr {lr:g} as configured'
    base = cfg.get('base_batch_size')
    if not isinstance(base, int) or isinstance(base, bool) or base < 1:
        raise ValueError(f'auto_scale_lr.base_batch_size must be a positive int, got {base!r}')
    task = cfg.get('task')
    if task is None:
        if len(set(batch_sizes.values())) != 1:
            raise ValueError(f'auto_scale_lr.task must name the task whose batch base_batch_size refers to: the '
                             f'tasks have different batch sizes {dict(batch_sizes)}')
        task = next(iter(batch_sizes))
    elif task not in batch_sizes:
        raise KeyError(f'auto_scale_lr.task={task!r} is not one of the tasks {list(batch_sizes)}')
    batch = world_size * batch_sizes[task] * accumulate_steps
    scaled = lr * batch / base
    accumulation = f' x {accumulate_steps} micro-batches' if accumulate_steps > 1 else ''
    return scaled, (f'auto_scale_lr: lr {lr:g} -> {scaled:g} (linear scaling: global batch {world_size} GPUs x '
                    f'{batch_sizes[task]} ({task}){accumulation} = {batch}, base {base})')


SCHEDULE_PHASES = ('LinearLR', 'CosineAnnealingLR', 'ConstantLR')


def check_schedule(phases: Sequence[dict]) -> None:
    """Phases (mmengine's ``param_scheduler`` list, iteration-based) must be known and must not overlap."""
    end = 0
    for i, phase in enumerate(phases):
        if phase.get('type') not in SCHEDULE_PHASES:
            raise KeyError(f'param_scheduler[{i}].type={phase.get("type")!r} is not one of {SCHEDULE_PHASES}')
        if phase.get('by_epoch', False):
            raise ValueError(f'param_scheduler[{i}]: training is iteration-based; set by_epoch=False')
        allowed = {'type', 'begin', 'end', 'by_epoch', 'start_factor', 'end_factor', 'factor', 'eta_min',
                   'eta_min_ratio', 'convert_to_iter_based'}
        unknown = set(phase) - allowed
        if unknown:
            raise KeyError(f'param_scheduler[{i}] has unknown keys {sorted(unknown)}')
        if phase.get('begin', 0) < end:
            raise ValueError(f'param_scheduler[{i}] begins at {phase.get("begin", 0)}, inside the previous phase '
                             f'(which ends at {end}); phases must not overlap')
        end = phase['end']


def scheduled_lr(base_lr: float, step: int, phases: Sequence[dict]) -> float:
    """Learning rate at ``step`` under consecutive phases; after a phase ends its last value holds.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    lr = base_lr
    for phase in phases:
        begin, end = phase.get('begin', 0), phase['end']
        if step < begin:
            break
        progress = min(step - begin, end - begin) / max(end - begin, 1)
        kind = phase['type']
        if kind == 'LinearLR':
            start, stop = phase.get('start_factor', 1.0 / 3), phase.get('end_factor', 1.0)
            lr = base_lr * (start + (stop - start) * progress)
        elif kind == 'ConstantLR':
            lr = base_lr * (phase.get('factor', 1.0 / 3) if step < end else 1.0)
        else:  # CosineAnnealingLR
            eta_min = phase.get('eta_min', base_lr * phase.get('eta_min_ratio', 0.0))
            lr = eta_min + (base_lr - eta_min) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr
