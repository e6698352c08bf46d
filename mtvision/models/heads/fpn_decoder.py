"""The dense decoder shared by the segmentation and depth heads."""
import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.necks import build_neck, make_norm
from mtvision.registry import MODELS


@MODELS.register_module()
class FPNDecoder(nn.Module):
    """Panoptic FPN's semantic branch (Kirillov et al., 2019, "Panoptic Feature Pyramid Networks") on a neck.

    Each pyramid level at stride ``s`` goes through ``max(1, log2(s / s_min))`` stages of 3x3 conv + norm + ReLU,
    each but a same-stride one followed by 2x bilinear upsampling, so all levels reach the finest stride ``s_min``;
    they are summed, a 1x1 conv predicts ``num_outputs`` channels and bilinear upsampling brings them to the image
    size.

    Args:
        in_channels: channels of each backbone map.
        in_strides: stride of each backbone map.
        num_outputs: channels of the output (classes for segmentation, 1 for depth).
        neck: neck config, on top of :data:`mtvision.models.necks.DEFAULT_NECK`; the neck must have
            ``out_channels`` and ``strides`` attributes and return its levels as a mapping.
        channels: width of the decoder stages.
        norm: ``'GN'`` (Panoptic FPN) or ``'LN'``.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], num_outputs: int,
                 neck: dict | None = None, channels: int = 64, norm: str = 'GN'):
        super().__init__()
        self.neck = build_neck(neck, in_channels, in_strides)
        finest = min(self.neck.strides)
        self.finest_index = list(self.neck.strides).index(finest)
        self.branches = nn.ModuleList()
        for stride in self.neck.strides:
            num_upsamplings = math.log2(stride / finest)
            if not num_upsamplings.is_integer():
                raise ValueError(f'neck strides {self.neck.strides} are not powers of two apart')
            stages = []
            for i in range(max(1, int(num_upsamplings))):
                stages += [
                    nn.Conv2d(self.neck.out_channels if i == 0 else channels, channels, kernel_size=3, padding=1,
                              bias=False),
                    make_norm(norm, channels),
                    nn.ReLU(inplace=True),
                ]
                if num_upsamplings > 0:
                    stages.append(nn.Upsample(scale_factor=2.0, mode='bilinear', align_corners=False))
            self.branches.append(nn.Sequential(*stages))
        self.predictor = nn.Conv2d(channels, num_outputs, kernel_size=1)

    def forward(self, features: BackboneOutput) -> Tensor:
        """Per-pixel outputs ``[B, num_outputs, H, W]`` at the input image size."""
        levels = list(self.neck(features.maps).values())
        finest_size = levels[self.finest_index].shape[-2:]
        fused = None
        for branch, level in zip(self.branches, levels):
            x = branch(level)
            if x.shape[-2:] != finest_size:
                # Odd map sizes do not survive pooling and 2x upsampling (7 -> 3 -> 6), so align them exactly.
                x = F.interpolate(x, size=finest_size, mode='bilinear', align_corners=False)
            fused = x if fused is None else fused + x
        return F.interpolate(self.predictor(fused), size=features.image_size, mode='bilinear', align_corners=False)


__all__ = ['FPNDecoder']
