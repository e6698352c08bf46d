"""Masked autoencoder (MAE, He et al. 2022): the pixel decoder and loss on top of a masked ViT forward."""
from collections.abc import Sequence

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mtvision.models.backbones.base import BackboneOutput
from mtvision.registry import MODELS

__all__ = ['MAEHead', 'patchify', 'unpatchify']


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, h * w, p * p * C]``, patches row-major, pixels in MAE's ``(p, p, C)`` order."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f'image size {height}x{width} is not a multiple of the patch size {patch_size}')
    h, w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, h * w, patch_size * patch_size * channels)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, h * w, p * p * C]`` -> ``[B, C, h * p, w * p]``."""
    batch, num_patches, patch_dim = patches.shape
    h, w = grid
    channels = patch_dim // (patch_size * patch_size)
    if num_patches != h * w or channels * patch_size * patch_size != patch_dim:
        raise ValueError(f'patches of shape {list(patches.shape)} do not fit a {h}x{w} grid of {patch_size}x'
                         f'{patch_size} patches')
    x = patches.reshape(batch, h, w, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, h * patch_size, w * patch_size)


def _sincos_pos_embed(grid: tuple[int, int], dim: int, device: torch.device | None = None) -> Tensor:
    """MAE's fixed 2-D sin-cos table ``[h * w, dim]`` (its two halves in (row, column) order; MAE's put the column
    first, an equivalent channel permutation)."""
    return build_sincos2d_pos_embed(list(grid), dim, interleave_sin_cos=True, device=device)


@MODELS.register_module()
class MAEHead(nn.Module):
    """MAE's decoder: reconstructs the pixels of the patches a masked backbone forward did not see.

    The encoder tokens are embedded to ``decoder_dim``, a learned mask token fills each masked position, the
    sequence is put back in patch order (``ids_restore``), a fixed 2-D sin-cos position embedding is added (prefix
    tokens get none, as MAE's class token), and ``decoder_depth`` transformer blocks, a LayerNorm and a Linear give
    ``p * p * 3`` pixels per patch. The loss is the per-patch MSE averaged over the masked patches only.

    The backbone must be called with ``mask_ratio=head.mask_ratio`` (MultiTaskModel does so for every head that has
    a ``mask_ratio``); a head given unmasked features raises.

    Args:
        in_channels: unused; every head is built with the backbone's map channels.
        in_strides: the backbone's map strides; the last is the default patch size.
        embed_dim: width of the backbone tokens.
        patch_size: pixels per patch side; defaults to ``in_strides[-1]``.
        decoder_dim: width of the decoder.
        decoder_depth: number of decoder blocks.
        decoder_heads: attention heads of each decoder block.
        mask_ratio: fraction of the patches hidden from the encoder (the backbone keeps ``int(N * (1 - ratio))``).
        norm_pix_loss: regress each patch's pixels normalised by that patch's own mean and variance (MAE's
            better-representation variant) instead of the (dataset-normalised) pixels.
        grid_size: the patch grid ``(h, w)`` of the training images, if known: its position table is then built once
            here; other grids still work, with the table built on each forward.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], embed_dim: int,
                 patch_size: int | None = None, decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 4,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = False, grid_size: Sequence[int] | None = None):
        super().__init__()
        if not 0 <= mask_ratio < 1:
            raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
        if decoder_dim % 4:
            raise ValueError(f'decoder_dim must be a multiple of 4 (2-D sin-cos position embedding), got {decoder_dim}')
        self.patch_size = patch_size if patch_size is not None else in_strides[-1]
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * 3)
        decoder_pos_embed = _sincos_pos_embed(self.grid_size, decoder_dim) if self.grid_size is not None else None
        self.register_buffer('decoder_pos_embed', decoder_pos_embed, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's initialisation: xavier-uniform Linears, zero biases, small normal mask token
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _grid(self, image_size: Sequence[int]) -> tuple[int, int]:
        height, width = image_size
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f'image size {height}x{width} is not a multiple of the patch size {self.patch_size}')
        return height // self.patch_size, width // self.patch_size

    def forward(self, features: BackboneOutput) -> dict:
        """``dict(pred=[B, N, p * p * 3] pixels of every patch, mask=[B, N] (1 = masked), image_size=(H, W))``."""
        if features.mask is None or features.ids_restore is None:
            raise ValueError('MAEHead needs a masked backbone forward: call the backbone with '
                             'mask_ratio=head.mask_ratio (MultiTaskModel does so for heads with a mask_ratio)')
        grid = self._grid(features.image_size)
        mask, ids_restore = features.mask, features.ids_restore
        batch, num_patches = mask.shape
        if num_patches != grid[0] * grid[1]:
            raise ValueError(f'the backbone masked {num_patches} patches, but a {features.image_size} image has '
                             f'{grid[0] * grid[1]} patches of size {self.patch_size}')
        # every row hides the same number of patches, so the first row tells where the prefix tokens end
        num_visible = num_patches - int(mask[0].sum())
        num_prefix = features.tokens.shape[1] - num_visible

        x = self.decoder_embed(features.tokens)
        prefix, visible = x[:, :num_prefix], x[:, num_prefix:]
        mask_tokens = self.mask_token.to(x.dtype).expand(batch, num_patches - num_visible, -1)
        shuffled = torch.cat([visible, mask_tokens], dim=1)
        patches = shuffled.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if grid == self.grid_size:
            pos_embed = self.decoder_pos_embed
        else:
            pos_embed = _sincos_pos_embed(grid, x.shape[-1], x.device)
        patches = patches + pos_embed.to(x.dtype)

        x = self.decoder_blocks(torch.cat([prefix, patches], dim=1))
        pred = self.decoder_pred(self.decoder_norm(x))[:, num_prefix:]
        return dict(pred=pred, mask=mask, image_size=tuple(features.image_size))

    def loss(self, outputs: dict, targets: Tensor) -> dict[str, Tensor]:
        """Per-patch MSE between ``pred`` and the patchified ``targets`` (the normalised images [B, 3, H, W]),
        averaged over the masked patches only, in float32."""
        pred, mask = outputs['pred'], outputs['mask']
        expected_shape = (pred.shape[0], 3, *outputs['image_size'])
        if tuple(targets.shape) != expected_shape:
            raise ValueError(f'mae targets must be the input images of shape {list(expected_shape)}, got '
                             f'{list(targets.shape)}')
        target = patchify(targets.float(), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        mask = mask.float()
        return dict(loss_mae=(per_patch * mask).sum() / mask.sum())

    @torch.no_grad()
    def predict(self, outputs: dict) -> dict[str, Tensor]:
        """``dict(images=[B, 3, H, W] reconstruction of every patch, mask=[B, 1, H, W] float, 1 = masked pixel)``.

        The reconstruction is in the space the loss regressed: normalised images, or with ``norm_pix_loss`` each
        patch normalised by its own pixel mean and variance; those statistics come from the targets, which
        ``predict`` does not see, so such a reconstruction is returned as is (its patches show structure, not the
        true brightness or contrast).
        """
        pred, mask = outputs['pred'], outputs['mask']
        grid = self._grid(outputs['image_size'])
        images = unpatchify(pred.float(), self.patch_size, grid)
        pixel_mask = mask.float().reshape(-1, 1, *grid)
        pixel_mask = pixel_mask.repeat_interleave(self.patch_size, dim=2).repeat_interleave(self.patch_size, dim=3)
        return dict(images=images, mask=pixel_mask)
