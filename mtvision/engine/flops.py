"""Model FLOPs utilisation (MFU): the training FLOP/s a run achieves over the FLOP/s its device can do.

The FLOPs are counted, not measured: a transformer's forward costs 2 FLOPs (a multiply and an add) per matmul
weight per token, plus the attention's two ``T x T`` products, and its backward twice the forward, so a training
step is 3 forwards (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1; the "6ND" rule that
PaLM's MFU uses, Chowdhery et al. 2022, appendix B). MFU is then the achieved FLOP/s over the device's dense bf16
peak (PaLM's definition), whatever precision the run trains in.
"""
import torch
from torch import nn

from mtvision.models.backbones.vit import ViT
from mtvision.models.heads.protocols import MaskedImageHead

# dense (not 2:4 sparse) bf16 / fp16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets; matched in order as
# substrings of torch.cuda.get_device_name (the specific names first)
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ('H100 PCIe', 756.0),
    ('H100 NVL', 835.0),
    ('H200 NVL', 835.0),
    ('H100', 989.0),
    ('H200', 989.0),
    ('A100', 312.0),
    ('L40S', 362.0),
    ('V100', 125.0),
)


def peak_flops(device: torch.device | str, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one ``device``: ``peak_tflops`` (``env_cfg.peak_tflops``) when given, else the table's entry
    for a known CUDA GPU; None when unknown (no MFU is reported then)."""
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f'env_cfg.peak_tflops must be positive, got {peak_tflops}')
        return float(peak_tflops) * 1e12
    device = torch.device(device)
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name), None)


def _matmul_weights(module: nn.Module) -> int:
    """Weights of the linear and convolution layers in ``module``: each does one multiply-add per token."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def vit_forward_flops(backbone: ViT, mask_ratio: float | None = None) -> float:
    """Forward FLOPs of one image at the backbone's ``img_size`` through a (dense) :class:`ViT`.

    The patch embedding sees every patch; the blocks see the prefix tokens and the patches kept by MAE's masking
    (``int(N * (1 - mask_ratio))``, as ``ViT._forward_masked``). Per block: 2 x its matmul weights per token and
    ``4 T^2 D`` for ``Q K^T`` and ``attention @ V``. Norms, softmax and activations are left out (under 1 %).
    """
    num_patches = backbone.grid_size[0] * backbone.grid_size[1]
    kept = num_patches if mask_ratio is None else int(num_patches * (1 - mask_ratio))
    tokens = backbone.num_prefix_tokens + kept
    blocks = backbone.model.blocks
    patch_embed = 2 * _matmul_weights(backbone.model.patch_embed) * num_patches
    attention = 4 * len(blocks) * tokens ** 2 * backbone.embed_dim
    return float(patch_embed + 2 * _matmul_weights(blocks) * tokens + attention)


def training_flops_per_image(model: nn.Module) -> dict[str, float]:
    """Per task, the training FLOPs (forward and backward, 3 forwards) of one image through ``model``'s backbone,
    masked as the task's head asks (``mask_ratio``); empty where not counted: backbones other than a dense ViT
    (Swin's windows and merges, MoE's routed experts). Heads and momentum encoders are not counted, so the MFU
    computed from these numbers is a lower bound."""
    backbone = model.backbone
    if not isinstance(backbone, ViT) or model.is_moe:
        return {}
    return {task: 3 * vit_forward_flops(backbone, head.mask_ratio if isinstance(head, MaskedImageHead) else None)
            for task, head in model.heads.items()}
