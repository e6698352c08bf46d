"""Speed switches of ``env_cfg``: TF32, cuDNN autotuning, ``torch.compile`` of the backbone, the gradient exchange
of data-parallel runs, FSDP2 mixed precision.

Each is read from the config once, at start-up, by the trainer::

    env_cfg = dict(tf32=True, cudnn_benchmark=False, compile=False, ddp_cfg=dict(overlap=True, bucket_cap_mb=25),
                   fsdp=False, fsdp_cfg=dict(mixed_precision=None))

(activation checkpointing is a backbone argument, ``model.backbone.grad_checkpointing``, and fused AdamW an
optimizer one, ``optim_wrapper.optimizer.fused``).
"""
from collections.abc import Mapping

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

COMPILE_KEYS = {'backend', 'mode', 'dynamic', 'fullgraph', 'options'}
DDP_KEYS = {'overlap', 'bucket_cap_mb'}
FSDP_KEYS = {'mixed_precision', 'reshard_after_forward', 'shard_size'}
MIXED_PRECISION = {'bf16': torch.bfloat16}


def _flag(cfg: Mapping, key: str, default: bool, where: str = 'env_cfg') -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise TypeError(f'{where}.{key} must be True or False, got {value!r} ({type(value).__name__})')
    return value


def apply_speed_settings(env_cfg: Mapping, deterministic: bool = False) -> str:
    """Sets torch's process-wide TF32 and cuDNN flags from ``env_cfg``; returns a line saying so, for the log.

    - ``tf32`` (default True): float32 matrix products and convolutions on CUDA tensor cores in TF32 (10-bit
      mantissa, float32 range), several times faster on Ampere and newer GPUs. DINOv2's training script
      (``dinov2/train/train.py``) turns it on too. It changes nothing on CPUs and older GPUs, nor under autocast
      (whose products are already bf16/fp16); ``tf32=False`` keeps full float32 products (torch's own default for
      matmuls).
    - ``cudnn_benchmark`` (default False): cuDNN times its convolution algorithms for each new input shape and
      keeps the fastest. It pays off for fixed shapes; with many shapes (detection, sliding-window evaluation)
      every new one is timed again, and the chosen algorithms may differ between runs. mmdetection's and
      mmpretrain's ``env_cfg`` default to False. Refused with ``randomness.deterministic=True``.
    """
    tf32 = _flag(env_cfg, 'tf32', True)
    benchmark = _flag(env_cfg, 'cudnn_benchmark', False)
    if benchmark and deterministic:
        raise ValueError('env_cfg.cudnn_benchmark=True picks convolution algorithms by timing them, which '
                         'randomness.deterministic=True forbids; turn one of them off')
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark
    return f'speed: TF32 {"on" if tf32 else "off"}, cudnn.benchmark {"on" if benchmark else "off"}'


def compile_options(env_cfg: Mapping) -> dict | None:
    """``env_cfg.compile``: False/None (default: eager), True (``torch.compile`` defaults) or a dict of
    ``torch.compile`` arguments (``backend``, ``mode``, ``dynamic``, ``fullgraph``, ``options``)."""
    value = env_cfg.get('compile', False)
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f'env_cfg.compile must be True, False or a dict of torch.compile arguments, got {value!r}')
    unknown = set(value) - COMPILE_KEYS
    if unknown:
        raise KeyError(f'env_cfg.compile has unknown keys {sorted(unknown)}; known: {sorted(COMPILE_KEYS)}')
    return dict(value)


def compile_backbone(backbone: nn.Module, env_cfg: Mapping) -> int:
    """Compiles each transformer block of ``backbone`` in place when ``env_cfg.compile`` asks; returns how many.

    Block by block (PyTorch's "regional compilation"; torchtitan compiles its models so): the blocks of a
    backbone share one compiled graph, so compiling costs one block whatever the depth; every forward reaches
    them (plain, MAE- or SimMIM-masked, checkpointed), and an MoE block's data-dependent dispatch breaks only its
    own graph. ``nn.Module.compile`` works in place, so parameter names (checkpoints, ``no_weight_decay``, FSDP
    units) stay those of the eager model, without the ``_orig_mod.`` of ``torch.compile(module)``. The heads stay
    eager: FCOS loops over images and levels in Python and calls torchvision's box ops and NMS, and the others are
    a small share of the step. Call it after the model is on its device (and after ``fully_shard``, whose hooks
    then run inside the compiled blocks).
    """
    options = compile_options(env_cfg)
    if options is None:
        return 0
    blocks = backbone.mlp_blocks()
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def ddp_options(ddp_cfg: Mapping | None) -> dict:
    """Keyword arguments of :class:`mtvision.distributed.GradientReducer` from ``env_cfg.ddp_cfg``.

    - ``overlap`` (default True): exchange each bucket of gradients as soon as the backward has produced it, so the
      exchange runs while the backward goes on; False exchanges every bucket after the backward.
    - ``bucket_cap_mb`` (default 25, DDP's): the size of a bucket. Smaller buckets start sooner; larger ones cost
      fewer collectives.
    """
    cfg = dict(ddp_cfg or {})
    unknown = set(cfg) - DDP_KEYS
    if unknown:
        raise KeyError(f'env_cfg.ddp_cfg has unknown keys {sorted(unknown)}; known: {sorted(DDP_KEYS)}')
    overlap = _flag(cfg, 'overlap', True, 'env_cfg.ddp_cfg')
    bucket_cap_mb = cfg.get('bucket_cap_mb', 25)
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or bucket_cap_mb <= 0:
        raise ValueError(f'env_cfg.ddp_cfg.bucket_cap_mb must be a positive number, got {bucket_cap_mb!r}')
    return dict(overlap=overlap, bucket_cap_mb=float(bucket_cap_mb))


def fsdp_options(fsdp_cfg: Mapping | None, world_size: int, device_type: str) -> dict:
    """Keyword arguments of ``fully_shard`` from ``env_cfg.fsdp_cfg`` (used with ``env_cfg.fsdp=True``).

    - ``mixed_precision``: None (default: parameters, gradients and their reduction in float32) or ``'bf16'``:
      each unit's gathered parameters are cast to bfloat16 for its forward and backward, and gradients are
      reduce-scattered in float32 (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``,
      torchtitan's default policy). The sharded float32 parameters stay the optimizer's master weights. No fp16:
      its range would need FSDP's sharded grad scaler.
    - ``reshard_after_forward`` (default True): free each unit's gathered parameters after its forward (ZeRO-3);
      False keeps them until the backward (ZeRO-2: more memory, one all-gather less per unit).
    - ``shard_size``: hybrid sharding (HSDP): shard within groups of this many ranks (e.g. the GPUs of a node) and
      replicate across the groups, so the all-gathers stay inside a node; it must divide the world size.
    """
    cfg = dict(fsdp_cfg or {})
    unknown = set(cfg) - FSDP_KEYS
    if unknown:
        raise KeyError(f'env_cfg.fsdp_cfg has unknown keys {sorted(unknown)}; known: {sorted(FSDP_KEYS)}')
    options = dict(reshard_after_forward=cfg.get('reshard_after_forward', True))
    precision = cfg.get('mixed_precision')
    if precision is not None:
        if precision not in MIXED_PRECISION:
            raise ValueError(f'env_cfg.fsdp_cfg.mixed_precision must be None or one of {sorted(MIXED_PRECISION)}, '
                             f'got {precision!r}')
        options['mp_policy'] = MixedPrecisionPolicy(param_dtype=MIXED_PRECISION[precision],
                                                    reduce_dtype=torch.float32)
    shard_size = cfg.get('shard_size')
    if shard_size is not None:
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1 \
                or world_size % shard_size:
            raise ValueError(f'env_cfg.fsdp_cfg.shard_size must be a positive int dividing the world size '
                             f'{world_size}, got {shard_size!r}')
        options['mesh'] = init_device_mesh(device_type, (world_size // shard_size, shard_size),
                                           mesh_dim_names=('replicate', 'shard'))
    return options


__all__ = ['apply_speed_settings', 'compile_backbone', 'compile_options', 'ddp_options', 'fsdp_options']
