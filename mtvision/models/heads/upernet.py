"""UperNet segmentation head: the ADE20K decoder of BEiT, MAE and Swin."""
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.heads.segmentation import SemanticFPNHead
from mtvision.models.necks import build_neck, make_norm
from mtvision.registry import MODELS


def conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, norm: str) -> nn.Sequential:
    """mmcv's ``ConvModule``: a bias-free convolution (the norm has the shift), a norm and ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         make_norm(norm, out_channels), nn.ReLU(inplace=True))


class UPerDecoder(nn.Module):
    """UperNet's decoder (Xiao et al., 2018, "Unified Perceptual Parsing for Scene Understanding") on a neck.

    The coarsest pyramid level goes through a pyramid pooling module (PSPNet, Zhao et al., 2017: average pooling to
    each of ``pool_scales`` cells per side, 1x1 conv, upsampling, concatenated with the level and fused by a 3x3 conv);
    the other levels get 1x1 lateral convs and are summed top-down as in FPN, then each gets a 3x3 conv. All levels are
    upsampled to the finest one, concatenated and fused by a 3x3 conv; dropout and a 1x1 conv predict the outputs,
    upsampled bilinearly to the image size. The layout of mmsegmentation's ``UPerHead``.

    Args:
        in_channels: channels of each backbone map.
        in_strides: stride of each backbone map.
        num_outputs: channels of the output.
        neck: neck config, on top of :data:`mtvision.models.necks.DEFAULT_NECK`; its levels must come finest first.
        channels: width of every decoder conv (512 in mmsegmentation's ADE20K configs).
        pool_scales: output sizes of the pyramid pooling module.
        norm: ``'GN'`` or ``'LN'`` (mmsegmentation uses SyncBN; GroupNorm does not depend on the batch, which
            varies from task to task here).
        dropout_ratio: of the channel dropout before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], num_outputs: int,
                 neck: dict | None = None, channels: int = 512, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 norm: str = 'GN', dropout_ratio: float = 0.1):
        super().__init__()
        self.neck = build_neck(neck, in_channels, in_strides)
        strides = list(self.neck.strides)
        if strides != sorted(strides) or len(set(strides)) != len(strides):
            raise ValueError(f'UperNet needs neck levels finest first, got strides {tuple(strides)}')
        if not pool_scales:
            raise ValueError('pool_scales must name at least one pooled size')
        if norm == 'GN' and 1 in pool_scales and channels == math.gcd(32, channels):
            raise ValueError(f'channels={channels} gives GroupNorm one channel per group, which turns the 1x1 map of '
                             f'pool scale 1 into zeros; use a multiple of 64 channels or norm=\'LN\'')
        width = self.neck.out_channels
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_norm_relu(width, channels, 1, norm))
                                   for scale in pool_scales)
        self.pool_fusion = conv_norm_relu(width + len(pool_scales) * channels, channels, 3, norm)
        self.laterals = nn.ModuleList(conv_norm_relu(width, channels, 1, norm) for _ in strides[:-1])
        self.smoothers = nn.ModuleList(conv_norm_relu(channels, channels, 3, norm) for _ in strides[:-1])
        self.fusion = conv_norm_relu(len(strides) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout_ratio)
        self.predictor = nn.Conv2d(channels, num_outputs, kernel_size=1)

    @staticmethod
    def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
        return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)

    def _pyramid_pooling(self, x: Tensor) -> Tensor:
        pooled = [self._resize(pool(x), x.shape[-2:]) for pool in self.pools]
        return self.pool_fusion(torch.cat([x, *pooled], dim=1))

    def forward(self, features: BackboneOutput) -> Tensor:
        """Per-pixel outputs ``[B, num_outputs, H, W]`` at the input image size."""
        levels = list(self.neck(features.maps).values())
        merged = [lateral(level) for lateral, level in zip(self.laterals, levels)]
        merged.append(self._pyramid_pooling(levels[-1]))
        for i in range(len(merged) - 1, 0, -1):  # top-down: each level adds the coarser one, upsampled
            merged[i - 1] = merged[i - 1] + self._resize(merged[i], merged[i - 1].shape[-2:])
        outs = [smoother(x) for smoother, x in zip(self.smoothers, merged)] + [merged[-1]]
        finest = outs[0].shape[-2:]
        fused = self.fusion(torch.cat([outs[0]] + [self._resize(x, finest) for x in outs[1:]], dim=1))
        return self._resize(self.predictor(self.dropout(fused)), features.image_size)


@MODELS.register_module()
class UPerHead(SemanticFPNHead):
    """Semantic segmentation with :class:`UPerDecoder`: BEiT's, MAE's and Swin's ADE20K head.

    Loss (pixel-wise cross-entropy and its normaliser), prediction and forward are :class:`SemanticFPNHead`'s; only
    the decoder differs.

    Args:
        num_classes: number of classes; target ids are ``0..num_classes - 1`` or ``ignore_index``.
        in_channels: channels of each backbone map.
        in_strides: stride of each backbone map.
        embed_dim: unused; every head is built with the backbone's width.
        neck: neck config, on top of :data:`mtvision.models.necks.DEFAULT_NECK`.
        channels: width of the decoder.
        pool_scales: output sizes of the pyramid pooling module.
        norm: norm of the decoder convs, ``'GN'`` or ``'LN'``.
        dropout_ratio: of the channel dropout before the classifier.
        ignore_index: target id of pixels that contribute no loss.
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int], in_strides: Sequence[int],
                 embed_dim: int | None = None, neck: dict | None = None, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), norm: str = 'GN', dropout_ratio: float = 0.1,
                 ignore_index: int = 255):
        # SemanticFPNHead.__init__ would build the Semantic FPN decoder this head replaces: set its state here.
        nn.Module.__init__(self)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.decoder = UPerDecoder(in_channels, in_strides, num_classes, neck=neck, channels=channels,
                                   pool_scales=pool_scales, norm=norm, dropout_ratio=dropout_ratio)


__all__ = ['UPerDecoder', 'UPerHead', 'conv_norm_relu']
