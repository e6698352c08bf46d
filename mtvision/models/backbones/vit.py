"""Plain Vision Transformer backbone: any timm ViT, with size overrides and multi-level features.

The model is built by ``timm.create_model`` and read through its public ``forward_intermediates`` API
(never patched), so every timm ViT variant and its pretrained weights work unchanged. A masked forward (MAE), and
any forward with activation checkpointing, calls timm's own submodules in the order of its ``forward_features``.
"""
from collections.abc import Sequence

import timm
import torch
from torch import Tensor, nn

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.backbones.checkpointing import run_block
from mtvision.models.moe import convert_blocks_to_moe
from mtvision.registry import MODELS


@MODELS.register_module()
class ViT(nn.Module):
    """A timm ViT returning :class:`BackboneOutput`.

    Args:
        model_name: any timm ViT name, e.g. ``'vit_tiny_patch16_224'``.
        out_indices: blocks whose outputs become ``maps`` (negative counts from the end).
        pretrained: load timm's pretrained weights (needs them cached or downloadable).
        pretrained_file: a local weights file for timm to load instead (safetensors or .pth).
        moe: replace the MLP of some blocks by task-routed mixture-of-experts layers, after any pretrained weights
            are loaded (so ``upcycle=True`` seeds every expert with the dense MLP); keys in
            :func:`~mtvision.models.moe.convert_blocks_to_moe`, e.g. ``dict(blocks='every_other', num_experts=8,
            top_k=2)``.
        tasks: the task names the MoE layers route (``MultiTaskModel`` passes its heads' names).
        grad_checkpointing: recompute each block's activations in the backward instead of storing them (see
            :mod:`~mtvision.models.backbones.checkpointing`): activation memory of one block instead of all, for
            about one more forward of the blocks per step.
        **overrides: timm model arguments such as ``img_size``, ``patch_size``, ``depth``, ``embed_dim``,
            ``num_heads``, ``drop_path_rate``.
    """

    def __init__(self, model_name: str = 'vit_tiny_patch16_224', out_indices: Sequence[int] = (-1,),
                 pretrained: bool = False, pretrained_file: str | None = None, moe: dict | None = None,
                 tasks: Sequence[str] = (), grad_checkpointing: bool = False, **overrides):
        super().__init__()
        timm_kwargs = dict(pretrained=pretrained or pretrained_file is not None, num_classes=0)
        if pretrained_file is not None:
            timm_kwargs['pretrained_cfg_overlay'] = dict(file=pretrained_file)
        self.model = timm.create_model(model_name, **timm_kwargs, **overrides)
        if moe:
            # experts start as copies of the dense MLP when it holds pretrained weights (sparse upcycling)
            moe = {'upcycle': pretrained or pretrained_file is not None, **moe}
            convert_blocks_to_moe(self.mlp_blocks(), moe, tasks)
        depth = len(self.model.blocks)
        self.out_indices = [i % depth for i in out_indices]
        if any(not -depth <= i < depth for i in out_indices):
            raise ValueError(f'out_indices {tuple(out_indices)} out of range for a ViT of depth {depth}')
        self.embed_dim = self.model.embed_dim
        stride = self.model.patch_embed.patch_size[0]
        self.patch_size: int = stride
        self.grid_size: tuple[int, int] = tuple(self.model.patch_embed.grid_size)
        self.out_channels = [self.embed_dim] * len(self.out_indices)
        self.out_strides = [stride] * len(self.out_indices)
        self.num_prefix_tokens = self.model.num_prefix_tokens
        self.has_cls_token = getattr(self.model, 'cls_token', None) is not None
        self.grad_checkpointing = grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (timm's method name; timm's own flag stays off, see ``grad_checkpointing``)."""
        self.grad_checkpointing = enable

    def forward(self, images: Tensor, mask_ratio: float | None = None, patch_mask: Tensor | None = None,
                mask_token: Tensor | None = None) -> BackboneOutput:
        """Features of ``images`` [B, 3, H, W]; with ``mask_ratio``, of a random subset of their patches (MAE); with
        ``patch_mask`` ([B, N] bool, True = masked, row-major over the patch grid) and ``mask_token`` ([C]), of the
        images whose masked patch embeddings are replaced by the token before the position embedding (BEiT, iBOT):
        every token goes through the blocks and ``mask`` is ``patch_mask`` as floats.

        Under masking, each sample keeps ``len_keep = int(N * (1 - mask_ratio))`` of its ``N`` patches (MAE's
        formula: exactly that many, rounded down), chosen uniformly at random with the global torch RNG, and only
        those (after the prefix tokens) go through the blocks. ``tokens`` are then the prefix tokens plus the
        ``len_keep`` visible tokens in shuffled order, ``maps`` is empty (there is no full grid), ``pooled`` is the
        mean of the visible tokens, and ``mask`` / ``ids_restore`` say which patches were kept.
        """
        if mask_ratio is not None:
            return self._forward_masked(images, mask_ratio)
        if patch_mask is not None:
            if mask_token is None:
                raise ValueError('a patch_mask needs the mask_token that replaces the masked patches')
            tokens, maps = self._forward_own_blocks(images, patch_mask, mask_token)
        elif self.grad_checkpointing:
            tokens, maps = self._forward_own_blocks(images)
        else:
            tokens, maps = self.model.forward_intermediates(images, indices=self.out_indices, output_fmt='NCHW')
        patch_tokens = tokens[:, self.num_prefix_tokens:]
        return BackboneOutput(
            maps=list(maps),
            tokens=tokens,
            cls_token=tokens[:, 0] if self.has_cls_token else None,
            pooled=patch_tokens.mean(dim=1),
            image_size=tuple(images.shape[-2:]),
            mask=None if patch_mask is None else patch_mask.float(),
        )

    def _run_blocks(self, x: Tensor, take: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """The blocks on ``x``: their final output, and the outputs of the blocks in ``take``."""
        taken = []
        for index, block in enumerate(self.model.blocks):
            x = run_block(block, x, self.grad_checkpointing)
            if index in take:
                taken.append(x)
        return x, taken

    def _forward_own_blocks(self, images: Tensor, patch_mask: Tensor | None = None,
                            mask_token: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        # timm's forward_intermediates (stop_early=False, norm=False, output_fmt='NCHW'), with checkpointed blocks
        # when asked, and masked patch embeddings replaced by the mask token
        model = self.model
        x = model.patch_embed(images)  # [B, N, C], or [B, h, w, C] with dynamic_img_size
        if patch_mask is not None:
            if not isinstance(model.patch_drop, nn.Identity):
                raise ValueError('a masked ViT forward cannot be combined with patch_drop_rate > 0; set it to 0')
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            if tuple(patch_mask.shape) != tuple(flat.shape[:2]):
                raise ValueError(f'patch_mask of shape {list(patch_mask.shape)} does not match the '
                                 f'{flat.shape[1]} patches of a batch of {flat.shape[0]}')
            x = torch.where(patch_mask.unsqueeze(-1), mask_token.to(flat.dtype), flat).reshape(x.shape)
        x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        x, taken = self._run_blocks(x, self.out_indices)
        height, width = model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        maps = [y[:, self.num_prefix_tokens:].reshape(y.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()
                for y in taken]
        return model.norm(x), maps

    def _forward_masked(self, images: Tensor, mask_ratio: float) -> BackboneOutput:
        model = self.model
        if not isinstance(model.patch_drop, nn.Identity):
            # timm's patch dropout would drop further tokens that mask and ids_restore know nothing about
            raise ValueError('a masked ViT forward cannot be combined with patch_drop_rate > 0; set it to 0')
        x = model._pos_embed(model.patch_embed(images))
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        batch, num_patches, dim = patches.shape
        len_keep = int(num_patches * (1 - mask_ratio))
        if not 0 <= mask_ratio < 1 or len_keep < 1:
            raise ValueError(f'mask_ratio must be in [0, 1) and keep at least one of the {num_patches} patches, '
                             f'got {mask_ratio}')
        noise = torch.rand(batch, num_patches, device=x.device)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        visible = patches.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(batch, num_patches, device=x.device)
        mask[:, :len_keep] = 0
        mask = mask.gather(1, ids_restore)

        x = model.norm_pre(torch.cat([prefix, visible], dim=1))
        x, _ = self._run_blocks(x)
        x = model.norm(x)
        return BackboneOutput(
            maps=[],
            tokens=x,
            cls_token=x[:, 0] if self.has_cls_token else None,
            pooled=x[:, self.num_prefix_tokens:].mean(dim=1),
            image_size=tuple(images.shape[-2:]),
            mask=mask,
            ids_restore=ids_restore,
        )

    def mlp_blocks(self) -> list[nn.Module]:
        """The transformer blocks in depth order: the ones ``moe.blocks`` indexes."""
        return list(self.model.blocks)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that AdamW should not decay."""
        return {f'model.{name}' for name in self.model.no_weight_decay()}


__all__ = ['ViT', 'BackboneOutput']

