"""Swin Transformer backbone: any timm Swin (v1, S3 or v2), with size overrides, multi-stage features and SimMIM
masking.

The model is built by ``timm.create_model`` and read through its public ``forward_intermediates`` API (never
patched), so timm's Swin variants and their pretrained weights work unchanged. timm's Swin works in NHWC; maps are
converted to NCHW here, once. A masked forward (SimMIM, Xie et al. 2022), and any forward with activation
checkpointing, calls timm's own submodules in the order of its ``forward_intermediates``, with a learned mask token
written over the masked patch embeddings.
"""
from collections.abc import Sequence

import timm
import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import Tensor, nn

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.backbones.checkpointing import run_block
from mtvision.models.moe import convert_blocks_to_moe
from mtvision.registry import MODELS

__all__ = ['Swin', 'BackboneOutput']

# both share the layout this wrapper relies on: NHWC ``patch_embed`` -> ``layers`` (stages) -> ``norm``
_SWIN_CLASSES = (SwinTransformer, SwinTransformerV2)


@MODELS.register_module()
class Swin(nn.Module):
    """A timm Swin Transformer returning :class:`BackboneOutput`.

    Args:
        model_name: a timm Swin name, e.g. ``'swin_tiny_patch4_window7_224'``, ``'swin_s3_tiny_224'`` or
            ``'swinv2_tiny_window8_256'`` (the ``swinv2_cr_*`` family is a different implementation and is refused).
        out_indices: stages whose outputs become ``maps``, shallow to deep (negative counts from the end).
        pretrained: load timm's pretrained weights (needs them cached or downloadable).
        pretrained_file: a local weights file for timm to load instead (safetensors or .pth).
        mask_patch_size: side in pixels of SimMIM's mask squares, used only by a masked forward; a multiple of the
            patch size that divides the image (SimMIM's default: 32).
        moe: replace the MLP of some blocks (counted across all stages, shallow to deep) by task-routed
            mixture-of-experts layers, after any pretrained weights are loaded; keys in
            :func:`~mtvision.models.moe.convert_blocks_to_moe`.
        tasks: the task names the MoE layers route (``MultiTaskModel`` passes its heads' names).
        grad_checkpointing: recompute each block's activations in the backward instead of storing them (see
            :mod:`~mtvision.models.backbones.checkpointing`).
        **overrides: timm model arguments such as ``img_size``, ``window_size``, ``embed_dim``, ``depths``,
            ``num_heads``, ``drop_path_rate``.

    ``embed_dim`` is the width of the last stage (the ``tokens`` and ``pooled`` width); ``out_channels`` and
    ``out_strides`` describe the stages in ``out_indices`` (strides 4, 8, 16, 32 for 4-pixel patches);
    ``grid_size`` is the patch grid of the configured ``img_size``. Swin has no prefix tokens.
    """

    def __init__(self, model_name: str = 'swin_tiny_patch4_window7_224', out_indices: Sequence[int] = (0, 1, 2, 3),
                 pretrained: bool = False, pretrained_file: str | None = None, mask_patch_size: int = 32,
                 moe: dict | None = None, tasks: Sequence[str] = (), grad_checkpointing: bool = False, **overrides):
        super().__init__()
        timm_kwargs = dict(pretrained=pretrained or pretrained_file is not None, num_classes=0)
        if pretrained_file is not None:
            timm_kwargs['pretrained_cfg_overlay'] = dict(file=pretrained_file)
        self.model = timm.create_model(model_name, **timm_kwargs, **overrides)
        if not isinstance(self.model, _SWIN_CLASSES):
            raise ValueError(f'model_name {model_name!r} builds a {type(self.model).__name__}, not a timm Swin '
                             f'Transformer ({" or ".join(cls.__name__ for cls in _SWIN_CLASSES)})')
        if moe:
            # experts start as copies of the dense MLP when it holds pretrained weights (sparse upcycling)
            moe = {'upcycle': pretrained or pretrained_file is not None, **moe}
            convert_blocks_to_moe(self.mlp_blocks(), moe, tasks)
        num_stages = len(self.model.layers)
        if any(not -num_stages <= i < num_stages for i in out_indices):
            raise ValueError(f'out_indices {tuple(out_indices)} out of range for a Swin with {num_stages} stages')
        # timm yields the stages shallow to deep, whatever order they are asked in
        self.out_indices = sorted({i % num_stages for i in out_indices})
        self.patch_size: int = self.model.patch_embed.patch_size[0]
        if mask_patch_size <= 0 or mask_patch_size % self.patch_size:
            raise ValueError(f'mask_patch_size must be a positive multiple of the patch size {self.patch_size}, '
                             f'got {mask_patch_size}')
        self.mask_patch_size = mask_patch_size
        self.grid_size: tuple[int, int] = tuple(self.model.patch_embed.grid_size)
        self.embed_dim: int = self.model.num_features
        info = self.model.feature_info
        self.out_channels: list[int] = [info[i]['num_chs'] for i in self.out_indices]
        self.out_strides: list[int] = [info[i]['reduction'] for i in self.out_indices]
        self.num_prefix_tokens = 0
        self.has_cls_token = False
        # SimMIM's learned mask token, in the patch-embedding width; used (and trained) only by masked forwards.
        # SimMIM initialises it with a normal of std .02 truncated at one std.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, info[0]['num_chs']))
        trunc_normal_(self.mask_token, std=.02, a=-.02, b=.02)
        self.grad_checkpointing = grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (timm's method name; timm's own flag stays off, see ``grad_checkpointing``)."""
        self.grad_checkpointing = enable

    def forward(self, images: Tensor, mask_ratio: float | None = None) -> BackboneOutput:
        """Features of ``images`` [B, 3, H, W]; with ``mask_ratio``, of the images with random squares masked (SimMIM).

        Under masking, the image is cut into ``M`` squares of ``mask_patch_size`` pixels and each sample masks
        exactly ``int(M * mask_ratio)`` of them (rounded down; ViT's MAE forward keeps ``int(N * (1 - ratio))``
        instead), chosen uniformly at random with the global torch RNG. The patch embeddings under masked squares
        are replaced by ``mask_token`` and every stage runs on the full grid, so all ``maps`` are present; ``mask``
        is [B, N] over the patch-embedding grid (row-major, 1 = masked) and ``ids_restore`` is None.
        """
        if mask_ratio is not None:
            return self._forward_masked(images, mask_ratio)
        if self.grad_checkpointing:
            return self._forward_stages(images, self.model.patch_embed(images))
        tokens, maps = self.model.forward_intermediates(images, indices=self.out_indices, output_fmt='NCHW')
        return self._output(tokens, list(maps), images)

    def random_mask(self, batch: int, image_size: Sequence[int], mask_ratio: float,
                    device: torch.device | None = None) -> Tensor:
        """SimMIM's random mask ``[B, N]`` (float, 1 = masked) over the patch grid of ``image_size`` images.

        Each sample masks exactly ``int(M * mask_ratio)`` of its ``M`` mask squares: those ranked first by a
        ``torch.rand(B, M)`` draw; each masked square covers ``(mask_patch_size / patch_size) ** 2`` patches.
        """
        if not 0 <= mask_ratio < 1:
            raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
        height, width = image_size
        if height % self.mask_patch_size or width % self.mask_patch_size:
            raise ValueError(f'image size {height}x{width} is not a multiple of mask_patch_size '
                             f'{self.mask_patch_size}')
        mask_grid = (height // self.mask_patch_size, width // self.mask_patch_size)
        num_squares = mask_grid[0] * mask_grid[1]
        num_masked = int(num_squares * mask_ratio)
        ids_shuffle = torch.rand(batch, num_squares, device=device).argsort(dim=1)
        mask = torch.zeros(batch, num_squares, device=device)
        mask.scatter_(1, ids_shuffle[:, :num_masked], 1.0)
        scale = self.mask_patch_size // self.patch_size
        mask = mask.reshape(batch, *mask_grid).repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        return mask.flatten(1)

    def _forward_masked(self, images: Tensor, mask_ratio: float) -> BackboneOutput:
        model = self.model
        mask = self.random_mask(images.shape[0], images.shape[-2:], mask_ratio, images.device)
        x = model.patch_embed(images)  # [B, h, w, C]
        batch, height, width, _ = x.shape
        # a where, not SimMIM's x * (1 - w) + token * w: masked embeddings are dropped outright, so not even a
        # non-finite pixel under a mask can reach the stages
        masked = mask.reshape(batch, height, width, 1).bool()
        x = torch.where(masked, self.mask_token.to(x.dtype), x)
        output = self._forward_stages(images, x)
        output.mask = mask
        return output

    def _forward_stages(self, images: Tensor, x: Tensor) -> BackboneOutput:
        """The stages (timm's ``SwinTransformerStage``: downsample, then blocks) and the final norm on the patch
        embeddings ``x`` [B, h, w, C] of ``images``."""
        maps = []
        for index, stage in enumerate(self.model.layers):
            x = stage.downsample(x)
            for block in stage.blocks:
                x = run_block(block, x, self.grad_checkpointing)
            if index in self.out_indices:
                maps.append(x.permute(0, 3, 1, 2).contiguous())
        return self._output(self.model.norm(x), maps, images)

    @staticmethod
    def _output(tokens: Tensor, maps: list[Tensor], images: Tensor) -> BackboneOutput:
        tokens = tokens.flatten(1, 2)  # NHWC -> [B, N, C], row-major
        return BackboneOutput(
            maps=maps,
            tokens=tokens,
            cls_token=None,
            pooled=tokens.mean(dim=1),
            image_size=tuple(images.shape[-2:]),
        )

    def mlp_blocks(self) -> list[nn.Module]:
        """The transformer blocks of every stage, shallow to deep: the ones ``moe.blocks`` indexes."""
        return [block for stage in self.model.layers for block in stage.blocks]

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that AdamW should not decay: timm's (the relative position
        bias tables of Swin v1; SwinV2's continuous position bias MLP and logit scales) and the mask token (as
        SimMIM's ``SwinTransformerForSimMIM``)."""
        return {f'model.{name}' for name in self.model.no_weight_decay()} | {'mask_token'}
