from collections.abc import Callable

import pytest
import torch

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.backbones.vit import ViT


@pytest.fixture
def fake_features() -> Callable[..., BackboneOutput]:
    """Factory of random ViT-like features: one map ``[B, C, S, S]`` at stride ``image_size // S``."""

    def make(batch: int = 2, channels: int = 32, size: int = 8, image_size: int = 64, seed: int = 0) -> BackboneOutput:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randn(batch, 1 + size * size, channels, generator=generator)
        patch_map = tokens[:, 1:].transpose(1, 2).reshape(batch, channels, size, size)
        return BackboneOutput(maps=[patch_map], tokens=tokens, cls_token=tokens[:, 0],
                              pooled=tokens[:, 1:].mean(dim=1), image_size=(image_size, image_size))

    return make


@pytest.fixture
def tiny_vit() -> ViT:
    """A one-block, width-32 ViT on 32x32 images with 8x8 patches (4x4 map at stride 8)."""
    torch.manual_seed(0)
    return ViT('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2).eval()
