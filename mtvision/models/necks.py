"""Necks: turn the backbone's single-scale ViT maps into a multi-scale pyramid for the dense heads."""
import math
from collections import OrderedDict
from collections.abc import Sequence

from timm.layers import LayerNorm2d
from torch import Tensor, nn

from mtvision.registry import MODELS

# What the dense heads use when their config names no neck: strides 4/8/16 for a patch-8 ViT. Cheaper than ViTDet's
# default (4, 2, 1, 0.5), whose stride-2 level dominates the cost at the small image sizes we train on.
DEFAULT_NECK = dict(type='SimpleFeaturePyramid', scale_factors=(2.0, 1.0, 0.5), out_channels=64)


def make_norm(norm: str, channels: int) -> nn.Module:
    """A normalisation layer for NCHW maps: ``'LN'`` (LayerNorm2d over channels) or ``'GN'`` (GroupNorm)."""
    if norm == 'LN':
        return LayerNorm2d(channels)
    if norm == 'GN':
        # 32 groups as in the GroupNorm paper; fewer when the channel count is not a multiple of 32.
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"norm must be 'LN' or 'GN', got {norm!r}")


@MODELS.register_module()
class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al., 2022, "Exploring Plain Vision Transformer Backbones for Object
    Detection"; detectron2's ``SimpleFeaturePyramid``).

    One backbone map at stride ``s`` becomes one level per scale factor ``f`` at stride ``s / f``: ``f > 1`` by
    ``log2 f`` stride-2 transposed convolutions (channels halved by each, norm + GELU between them), ``f == 1``
    as is, ``f < 1`` by max pooling. Each level then gets a 1x1 and a 3x3 convolution, each followed by a norm, to
    ``out_channels``.

    Args:
        in_channels: channels of each backbone map.
        in_strides: stride of each backbone map.
        out_channels: channels of every pyramid level.
        scale_factors: powers of two, finest first, e.g. ``(4, 2, 1, 0.5)`` (ViTDet).
        in_index: which backbone map the pyramid is built from (ViTDet uses the last).
        norm: ``'LN'`` (ViTDet) or ``'GN'``, after each output convolution.

    Attributes:
        out_channels: channels of every level (one int, as torchvision's detectors expect).
        strides: stride of each level, in the order of ``scale_factors``.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], out_channels: int = 64,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5), in_index: int = -1, norm: str = 'LN'):
        super().__init__()
        if not -len(in_channels) <= in_index < len(in_channels):
            raise ValueError(f'in_index {in_index} out of range for {len(in_channels)} backbone maps')
        if list(scale_factors) != sorted(set(scale_factors), reverse=True):
            raise ValueError(f'scale_factors must be strictly decreasing (finest first), got {tuple(scale_factors)}')
        self.in_index = in_index
        self.out_channels = out_channels
        dim, in_stride = in_channels[in_index], in_strides[in_index]
        self.strides = []
        self.levels = nn.ModuleList()
        for scale in scale_factors:
            if scale <= 0 or not math.log2(scale).is_integer():
                raise ValueError(f'scale_factors must be powers of two, got {scale}')
            steps = round(math.log2(scale))  # >0: upsample 2**steps times, <0: pool
            if steps > 0 and in_stride % 2 ** steps != 0:
                raise ValueError(f'scale factor {scale} of a stride-{in_stride} map gives a fractional stride')
            if steps > 0 and dim % 2 ** steps != 0:
                raise ValueError(f'scale factor {scale} halves the {dim} channels {steps} times: not divisible')
            layers, level_dim = self._resample(dim, steps, norm)
            layers += [
                nn.Conv2d(level_dim, out_channels, kernel_size=1, bias=False), make_norm(norm, out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                make_norm(norm, out_channels),
            ]
            self.levels.append(nn.Sequential(*layers))
            self.strides.append(in_stride // 2 ** steps if steps > 0 else in_stride * 2 ** -steps)

    @staticmethod
    def _resample(dim: int, steps: int, norm: str) -> tuple[list[nn.Module], int]:
        """Layers that change the resolution by ``2 ** steps``, and the channels they output."""
        if steps <= 0:
            return ([nn.MaxPool2d(kernel_size=2 ** -steps, stride=2 ** -steps)] if steps < 0 else []), dim
        layers = []
        for step in range(steps):
            if step > 0:
                # Norm and activation go between stacked upsamplings only: the last one feeds the normed 1x1 conv.
                layers += [make_norm(norm, dim), nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
            dim //= 2
        return layers, dim

    def forward(self, maps: Sequence[Tensor]) -> OrderedDict[str, Tensor]:
        """Pyramid levels named ``'0'``, ``'1'``, ... (finest first) from the backbone's list of NCHW maps."""
        x = maps[self.in_index]
        return OrderedDict((str(i), level(x)) for i, level in enumerate(self.levels))


def build_neck(cfg: dict | None, in_channels: Sequence[int], in_strides: Sequence[int]) -> nn.Module:
    """Build a neck for a head from its ``neck`` config on top of :data:`DEFAULT_NECK`.

    Keys missing from ``cfg`` take their :data:`DEFAULT_NECK` values when ``cfg`` names the same type (or none), so
    ``neck=dict(out_channels=32)`` changes only the width.
    """
    cfg = dict(cfg or {})
    if cfg.get('type', DEFAULT_NECK['type']) == DEFAULT_NECK['type']:
        cfg = {**DEFAULT_NECK, **cfg}
    return MODELS.build(cfg, default_args=dict(in_channels=list(in_channels), in_strides=list(in_strides)))


__all__ = ['DEFAULT_NECK', 'SimpleFeaturePyramid', 'build_neck', 'make_norm']
