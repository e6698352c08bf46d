"""Plain Vision Transformer backbone: any timm ViT, with size overrides and multi-level features.

The model is built by ``timm.create_model`` and read through its public ``forward_intermediates`` API
(never patched), so every timm ViT variant and its pretrained weights work unchanged.
"""
from collections.abc import Sequence

import timm

from torch import Tensor, nn

from mtvision.models.backbones.base import BackboneOutput
from mtvision.registry import MODELS


@MODELS.register_module()
class ViT(nn.Module):
    """A timm ViT returning :class:`BackboneOutput`.

    Args:
        model_name: any timm ViT name, e.g. ``'vit_tiny_patch16_224'``.
        out_indices: blocks whose outputs become ``maps`` (negative counts from the end).
        pretrained: load timm's pretrained weights (needs them cached or downloadable).
        pretrained_file: a local weights file for timm to load instead (safetensors or .pth).
        **overrides: timm model arguments such as ``img_size``, ``patch_size``, ``depth``, ``embed_dim``,
            ``num_heads``, ``drop_path_rate``.
    """

    def __init__(self, model_name: str = 'vit_tiny_patch16_224', out_indices: Sequence[int] = (-1,),
                 pretrained: bool = False, pretrained_file: str | None = None, **overrides):
        super().__init__()
        timm_kwargs = dict(pretrained=pretrained or pretrained_file is not None, num_classes=0)
        if pretrained_file is not None:
            timm_kwargs['pretrained_cfg_overlay'] = dict(file=pretrained_file)
        self.model = timm.create_model(model_name, **timm_kwargs, **overrides)
        depth = len(self.model.blocks)
        self.out_indices = [i % depth for i in out_indices]
        if any(not -depth <= i < depth for i in out_indices):
            raise ValueError(f'out_indices {tuple(out_indices)} out of range for a ViT of depth {depth}')
        self.embed_dim = self.model.embed_dim
        stride = self.model.patch_embed.patch_size[0]
        self.out_channels = [self.embed_dim] * len(self.out_indices)
        self.out_strides = [stride] * len(self.out_indices)
        self.num_prefix_tokens = self.model.num_prefix_tokens
        self.has_cls_token = getattr(self.model, 'cls_token', None) is not None

    def forward(self, images: Tensor) -> BackboneOutput:
        tokens, maps = self.model.forward_intermediates(images, indices=self.out_indices, output_fmt='NCHW')
        patch_tokens = tokens[:, self.num_prefix_tokens:]
        return BackboneOutput(
            maps=list(maps),
            tokens=tokens,
            cls_token=tokens[:, 0] if self.has_cls_token else None,
            pooled=patch_tokens.mean(dim=1),
            image_size=tuple(images.shape[-2:]),
        )

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that AdamW should not decay."""
        return {f'model.{name}' for name in self.model.no_weight_decay()}


__all__ = ['ViT', 'BackboneOutput']

