from collections import OrderedDict

import pytest
import torch
from torch import nn

from mtvision.models.necks import DEFAULT_NECK, SimpleFeaturePyramid, build_neck


def test_levels_have_the_strides_and_sizes_of_their_scale_factors():
    neck = SimpleFeaturePyramid([128], [8], out_channels=32, scale_factors=(4.0, 2.0, 1.0, 0.5))
    levels = neck([torch.randn(2, 128, 8, 8)])

    assert isinstance(levels, OrderedDict) and list(levels) == ['0', '1', '2', '3']
    assert neck.strides == [2, 4, 8, 16] and neck.out_channels == 32
    for stride, level in zip(neck.strides, levels.values()):
        assert level.shape == (2, 32, 64 // stride, 64 // stride)


def test_in_index_selects_the_map_the_pyramid_is_built_from():
    neck = SimpleFeaturePyramid([16, 24], [8, 8], out_channels=8, scale_factors=(1.0,), in_index=0)
    first = torch.randn(1, 16, 4, 4)
    out_a = neck([first, torch.randn(1, 24, 4, 4)])['0']
    out_b = neck([first, torch.randn(1, 24, 4, 4)])['0']
    torch.testing.assert_close(out_a, out_b)
    assert not torch.allclose(out_a, neck([torch.randn(1, 16, 4, 4), torch.randn(1, 24, 4, 4)])['0'])


@pytest.mark.parametrize('norm', ['LN', 'GN'])
def test_every_level_ends_normalised(norm):
    neck = SimpleFeaturePyramid([32], [8], out_channels=32, scale_factors=(2.0, 0.5), norm=norm)
    for level in neck([torch.randn(2, 32, 8, 8) * 5 + 3]).values():
        # At initialisation the norms' affine maps are the identity, so statistics are those of the norm itself.
        if norm == 'LN':
            groups = level.permute(0, 2, 3, 1)  # statistics over channels, per pixel
        else:
            groups = level.reshape(2, 32, -1)  # GroupNorm(32, 32): statistics over each channel's pixels
        torch.testing.assert_close(groups.mean(-1), torch.zeros(groups.shape[:-1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(groups.var(-1, unbiased=False), torch.ones(groups.shape[:-1]), atol=2e-2, rtol=0)
    expected = nn.GroupNorm if norm == 'GN' else nn.LayerNorm
    assert any(isinstance(module, expected) for module in neck.modules())


@pytest.mark.parametrize('kwargs, message', [
    (dict(scale_factors=(3.0, 1.0)), 'powers of two'),
    (dict(scale_factors=(1.0, 2.0)), 'strictly decreasing'),
    (dict(scale_factors=(16.0,)), 'fractional stride'),
    (dict(in_index=2), 'in_index 2 out of range'),
    (dict(norm='BN'), "norm must be 'LN' or 'GN'"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimpleFeaturePyramid([32], [8], **kwargs)


def test_build_neck_fills_missing_keys_from_the_default():
    neck = build_neck(dict(out_channels=32), [128], [8])
    assert neck.out_channels == 32
    assert neck.strides == [int(8 / scale) for scale in DEFAULT_NECK['scale_factors']]
