"""What every backbone returns, so heads never depend on which backbone produced their input."""
from dataclasses import dataclass

from torch import Tensor


@dataclass
class BackboneOutput:
    maps: list[Tensor]  # NCHW feature maps at the backbone's out_indices, shallow to deep
    tokens: Tensor  # final normalised tokens [B, prefix + N, C]
    cls_token: Tensor | None  # [B, C]; None for backbones without a class token
    pooled: Tensor  # [B, C], mean of the final patch tokens
    image_size: tuple[int, int]  # (H, W) of the input images
