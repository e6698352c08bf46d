"""Optimizer with parameter groups, and the iteration-based learning-rate schedule."""
import inspect
import logging
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

OPTIMIZERS = {'AdamW': torch.optim.AdamW, 'Adam': torch.optim.Adam, 'SGD': torch.optim.SGD}
PARAMWISE_KEYS = {'layer_decay_rate', 'custom_keys'}
CUSTOM_KEY_OPTIONS = {'lr_mult', 'decay_mult'}
# outside the blocks, what runs before the first one: timm's ViT ``group_matcher`` stem, Swin's patch embedding and
# absolute position embedding, and SimMIM's mask token (layer 0 in SimMIM's fine-tuning), which the Swin wrapper
# registers after timm's model, so the registration order alone would put it last
STEM_NAMES = {'patch_embed', 'cls_token', 'reg_token', 'pos_embed', 'absolute_pos_embed', 'norm_pre', 'mask_token'}


def trained_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, bool]]:
    """``(name, parameter, decays)`` of every parameter the optimizer trains (``requires_grad``).

    ``decays`` is False for norm scales and biases (every tensor of one dimension or less) and the names the model
    lists in ``no_weight_decay()`` (position embeddings, class token), as in timm and MAE.
    """
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            yield name, param, not (param.ndim <= 1 or name in skip)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the parameters weight decay should not shrink (see
    :func:`trained_parameters`)."""
    decay, no_decay = [], []
    for _, param, decays in trained_parameters(model):
        (decay if decays else no_decay).append(param)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """The layer id of each backbone parameter of ``model`` (names as ``model.named_parameters()`` gives them) for
    layer-wise learning-rate decay, and the number of blocks ``L``.

    BEiT's and MAE's numbering (Bao et al. 2022; MAE's ``util/lr_decay.py``): 0 for the stem (patch embedding,
    class and register tokens, position embeddings, the pre-norm, the mask token), ``i + 1`` for block ``i`` of the
    backbone's ``mlp_blocks()`` (an MoE layer inside a block included), ``L + 1`` for what runs after the last block
    (the final norm; the heads, which are not in the returned dict). Swin's blocks are numbered consecutively across
    its stages, and a patch merging between two stages shares the id of the block before it, as in SimMIM's and
    mmpretrain's Swin fine-tuning. Where a parameter outside the stem and the blocks lies is read from the order
    the backbone registers its modules in, which follows the forward in timm's models.
    """
    backbone = getattr(model, 'backbone', None)
    if not hasattr(backbone, 'mlp_blocks'):
        raise TypeError(f'optim_wrapper.paramwise_cfg.layer_decay_rate needs a model whose backbone lists its blocks '
                        f'(mlp_blocks()), got {type(model).__name__}')
    blocks = backbone.mlp_blocks()
    block_index = {id(block): index for index, block in enumerate(blocks)}
    block_prefixes = [(f'{name}.', block_index[id(module)]) for name, module in backbone.named_modules()
                      if id(module) in block_index]
    num_layers = len(blocks)
    ids, previous_block = {}, None
    for name, _ in backbone.named_parameters():
        block = next((index for prefix, index in block_prefixes if name.startswith(prefix)), None)
        if block is not None:
            ids[name], previous_block = block + 1, block
        elif STEM_NAMES & set(name.split('.')) or previous_block is None:
            ids[name] = 0
        else:
            ids[name] = num_layers + 1 if previous_block == num_layers - 1 else previous_block + 1
    return {f'backbone.{name}': layer_id for name, layer_id in ids.items()}, num_layers


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def paramwise_groups(model: nn.Module, lr: float, weight_decay: float, paramwise_cfg: Mapping) -> list[dict]:
    """Parameter groups with per-parameter learning rates and weight decay (BEiT / MAE / mmpretrain fine-tuning).

    ``paramwise_cfg`` keys:

    - ``layer_decay_rate`` (None: off): layer-wise learning-rate decay; a parameter of layer id ``i`` (see
      :func:`layer_ids`) gets ``lr * rate ** (L + 1 - i)``: the heads and final norm the full rate, the stem
      ``rate ** (L + 1)``.
    - ``custom_keys``: ``{key: dict(lr_mult=..., decay_mult=...)}`` as mmengine's: the longest key (then the first
      in alphabetical order) that is a substring of a parameter's name multiplies its learning rate by ``lr_mult``
      and its weight decay by ``decay_mult`` (both default 1). Norm scales, biases and ``no_weight_decay()`` names
      keep a weight decay of 0 whatever ``decay_mult`` says. A key that matches no trained parameter is an error.

    One group per (layer id, lr_mult, decay_mult, decayed or not), shallow to deep, each with ``lr`` (the learning
    rate the schedule scales), ``lr_scale`` (``lr`` over the configured one) and, under layer decay, ``layer_id``.
    """
    unknown = sorted(set(paramwise_cfg) - PARAMWISE_KEYS)
    if unknown:
        raise KeyError(f'optim_wrapper.paramwise_cfg has unknown keys {unknown}; known: {sorted(PARAMWISE_KEYS)}')
    rate = paramwise_cfg.get('layer_decay_rate')
    if rate is not None:
        if not _is_number(rate) or not 0 < rate <= 1:
            raise ValueError(f'optim_wrapper.paramwise_cfg.layer_decay_rate must be a number in (0, 1] or None, '
                             f'got {rate!r}')
        ids, num_layers = layer_ids(model)
    custom_keys = dict(paramwise_cfg.get('custom_keys') or {})
    multipliers = {}
    for key, options in custom_keys.items():
        if not isinstance(options, Mapping) or set(options) - CUSTOM_KEY_OPTIONS:
            raise KeyError(f'optim_wrapper.paramwise_cfg.custom_keys[{key!r}] must be a dict with keys among '
                           f'{sorted(CUSTOM_KEY_OPTIONS)}, got {options!r}')
        multipliers[key] = tuple(options.get(option, 1.0) for option in ('lr_mult', 'decay_mult'))
        if not all(_is_number(value) and value >= 0 for value in multipliers[key]):
            raise ValueError(f'optim_wrapper.paramwise_cfg.custom_keys[{key!r}]: lr_mult and decay_mult must be '
                             f'numbers >= 0, got {options!r}')
    ordered_keys = sorted(sorted(custom_keys), key=len, reverse=True)
    unmatched = set(custom_keys)
    groups, first_names = {}, {}
    for name, param, decays in trained_parameters(model):
        custom_key = next((key for key in ordered_keys if key in name), None)
        unmatched.discard(custom_key)
        lr_mult, decay_mult = multipliers.get(custom_key, (1.0, 1.0))
        layer_id = None if rate is None else ids.get(name, num_layers + 1)
        group_key = (layer_id or 0, lr_mult, decay_mult, not decays)
        if group_key not in groups:
            scale = lr_mult * (1.0 if rate is None else rate ** (num_layers + 1 - layer_id))
            group = dict(params=[], lr=lr * scale, weight_decay=weight_decay * decay_mult if decays else 0.0,
                         lr_scale=scale)
            if rate is not None:
                group['layer_id'] = layer_id
            groups[group_key], first_names[group_key] = group, name
        groups[group_key]['params'].append(param)
    if unmatched:
        raise KeyError(f'optim_wrapper.paramwise_cfg.custom_keys {sorted(unmatched)} match no trained parameter '
                       f'(keys are substrings of names such as {next(trained_parameters(model))[0]!r})')
    order = sorted(groups)  # shallow to deep
    rows = [f'{"layer":>5} {"lr_scale":>9} {"lr":>9} {"weight_decay":>12} {"tensors":>7}  first parameter']
    for group_key in order:
        group = groups[group_key]
        rows.append(f'{group.get("layer_id", "-"):>5} {group["lr_scale"]:>9.4g} {group["lr"]:>9.3g} '
                    f'{group["weight_decay"]:>12.3g} {len(group["params"]):>7}  {first_names[group_key]}')
    decay = 'no layer decay' if rate is None else f'layer_decay_rate {rate:g} over {num_layers} blocks'
    logger.info('paramwise_cfg: %d parameter groups (%s)\n%s', len(order), decay, '\n'.join(rows))
    return [groups[group_key] for group_key in order]


def build_optimizer(model: nn.Module, optimizer_cfg: dict, paramwise_cfg: Mapping | None = None
                    ) -> torch.optim.Optimizer:
    """``optimizer_cfg`` is ``optim_wrapper.optimizer`` of the config, e.g. ``dict(type='AdamW', lr=1e-3)``, and
    ``paramwise_cfg`` its ``optim_wrapper.paramwise_cfg`` (see :func:`paramwise_groups`; None or empty: the two
    groups of :func:`param_groups`).

    ``fused`` (default None): None uses torch's fused kernels (one kernel per step for all parameters) when every
    trained parameter is a CUDA tensor and torch's default otherwise (``foreach``); True or False as torch's
    argument (True works on CPU too, with torch's CPU kernel).
    """
    cfg = dict(optimizer_cfg)
    kind = cfg.pop('type', 'AdamW')
    if kind not in OPTIMIZERS:
        raise KeyError(f'optim_wrapper.optimizer.type={kind!r} is not one of {sorted(OPTIMIZERS)}')
    weight_decay = cfg.pop('weight_decay', 0.0)
    if paramwise_cfg:
        lr = cfg.get('lr', inspect.signature(OPTIMIZERS[kind]).parameters['lr'].default)
        groups = paramwise_groups(model, lr, weight_decay, paramwise_cfg)
    else:
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


SCHEDULE_PHASES = ('LinearLR', 'CosineAnnealingLR', 'ConstantLR', 'PolyLR')


def check_schedule(phases: Sequence[dict]) -> None:
    """Phases (mmengine's ``param_scheduler`` list, iteration-based) must be known and must not overlap."""
    end = 0
    for i, phase in enumerate(phases):
        if phase.get('type') not in SCHEDULE_PHASES:
            raise KeyError(f'param_scheduler[{i}].type={phase.get("type")!r} is not one of {SCHEDULE_PHASES}')
        if phase.get('by_epoch', False):
            raise ValueError(f'param_scheduler[{i}]: training is iteration-based; set by_epoch=False')
        allowed = {'type', 'begin', 'end', 'by_epoch', 'start_factor', 'end_factor', 'factor', 'eta_min',
                   'eta_min_ratio', 'convert_to_iter_based', 'power'}
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
        elif kind == 'PolyLR':  # mmsegmentation's schedule; mmengine's reaches eta_min at the phase's last step
            eta_min = phase.get('eta_min', base_lr * phase.get('eta_min_ratio', 0.0))
            last = max(end - begin - 1, 1)
            lr = eta_min + (base_lr - eta_min) * (1 - min(step - begin, last) / last) ** phase.get('power', 1.0)
        else:  # CosineAnnealingLR
            eta_min = phase.get('eta_min', base_lr * phase.get('eta_min_ratio', 0.0))
            lr = eta_min + (base_lr - eta_min) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr
