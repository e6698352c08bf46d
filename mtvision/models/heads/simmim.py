"""SimMIM (Xie et al. 2022): the one-layer pixel prediction head and masked L1 loss on top of a masked backbone
forward that keeps the full grid (Swin)."""
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.models.backbones.base import BackboneOutput
from mtvision.registry import MODELS

__all__ = ['SimMIMHead', 'upsample_patch_mask']


def upsample_patch_mask(mask: Tensor, image_size: Sequence[int]) -> Tensor:
    """A patch mask ``[B, N]`` (row-major over the patch grid) -> the pixel mask ``[B, 1, H, W]`` of ``image_size``.

    The patch size is the one that tiles ``image_size`` into exactly ``N`` square patches.
    """
    batch, num_patches = mask.shape
    height, width = image_size
    patch_size = math.isqrt(height * width // num_patches) if num_patches else 0
    if not patch_size or height % patch_size or width % patch_size or \
            (height // patch_size) * (width // patch_size) != num_patches:
        raise ValueError(f'a mask over {num_patches} patches does not tile a {height}x{width} image into square '
                         f'patches')
    grid = (height // patch_size, width // patch_size)
    pixel_mask = mask.reshape(batch, 1, *grid)
    return pixel_mask.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


@MODELS.register_module()
class SimMIMHead(nn.Module):
    """SimMIM's prediction head: a 1x1 convolution from the deepest map to ``stride ** 2 * 3`` channels and a
    PixelShuffle to full resolution, regressing the pixels of the whole image; the loss is the L1 error over the
    masked pixels only.

    The backbone must be called with ``mask_ratio=head.mask_ratio`` (MultiTaskModel does so for every head that has
    a ``mask_ratio``) and must keep its maps under masking, as :class:`~mtvision.models.backbones.swin.Swin` does
    (it writes a mask token over the masked patches); a head given unmasked features, or a masked forward without
    maps (the ViT wrapper's MAE forward drops the masked tokens), raises.

    Args:
        in_channels: channels of the backbone maps; the last map feeds the head.
        in_strides: strides of the backbone maps; the last is the upsampling factor.
        embed_dim: unused; every head is built with the backbone's token width.
        mask_ratio: fraction of the mask squares the backbone hides (SimMIM's default: 0.6).
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], embed_dim: int | None = None,
                 mask_ratio: float = 0.6):
        super().__init__()
        if not 0 <= mask_ratio < 1:
            raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
        self.mask_ratio = mask_ratio
        self.stride = in_strides[-1]
        self.in_chans = 3
        # SimMIM's whole decoder: one linear layer per location, PixelShuffle arranges its outputs into pixels
        self.decoder = nn.Sequential(
            nn.Conv2d(in_channels[-1], self.stride ** 2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride),
        )

    def forward(self, features: BackboneOutput) -> dict:
        """``dict(pred=[B, 3, H, W] pixels, mask=[B, 1, H, W] (1 = masked pixel), image_size=(H, W))``."""
        if features.mask is None:
            raise ValueError('SimMIMHead needs a masked backbone forward: call the backbone with '
                             'mask_ratio=head.mask_ratio (MultiTaskModel does so for heads with a mask_ratio)')
        if not features.maps:
            raise ValueError('SimMIMHead needs the feature maps of a masked forward, and this backbone returned none: '
                             'a ViT masked forward (MAE) drops the masked tokens and has no full grid; use a backbone '
                             'that keeps the grid under masking (Swin) or the MAE head')
        height, width = features.image_size
        last = features.maps[-1]
        if (last.shape[-2] * self.stride, last.shape[-1] * self.stride) != (height, width):
            raise ValueError(f'the last map {tuple(last.shape[-2:])} at stride {self.stride} does not cover the '
                             f'{height}x{width} image')
        pred = self.decoder(last)
        mask = upsample_patch_mask(features.mask, (height, width))
        return dict(pred=pred, mask=mask, image_size=(height, width))

    def loss(self, outputs: dict, targets: Tensor) -> dict[str, Tensor]:
        """L1 between ``pred`` and ``targets`` (the normalised input images [B, 3, H, W]) on the masked pixels only,
        averaged over masked pixels and channels, in float32: SimMIM's
        ``(l1 * mask).sum() / (mask.sum() + 1e-5) / in_chans``."""
        pred, mask = outputs['pred'], outputs['mask']
        if tuple(targets.shape) != tuple(pred.shape):
            raise ValueError(f'simmim targets must be the input images of shape {list(pred.shape)}, got '
                             f'{list(targets.shape)}')
        l1 = F.l1_loss(pred.float(), targets.float(), reduction='none')
        mask = mask.float()
        return dict(loss_simmim=(l1 * mask).sum() / (mask.sum() + 1e-5) / self.in_chans)

    @torch.no_grad()
    def predict(self, outputs: dict) -> dict[str, Tensor]:
        """``dict(images=[B, 3, H, W] reconstruction of every pixel, mask=[B, 1, H, W] float, 1 = masked pixel)``,
        in the normalised input space (the MAE head's format)."""
        return dict(images=outputs['pred'].float(), mask=outputs['mask'].float())
