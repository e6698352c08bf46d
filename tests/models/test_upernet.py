import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtvision.models.heads.segmentation import SemanticFPNHead
from mtvision.models.heads.upernet import UPerHead
from mtvision.registry import MODELS

NECK = dict(out_channels=32, scale_factors=(4.0, 2.0, 1.0, 0.5))  # ViTDet's four levels, strides 2 to 16 here


def make_head(num_classes: int = 5, neck=NECK, channels: int = 64, **kwargs) -> UPerHead:
    torch.manual_seed(0)
    return UPerHead(num_classes=num_classes, in_channels=[32], in_strides=[8], neck=neck, channels=channels,
                    **kwargs).eval()


def conv_block(block, x):
    """A conv + GroupNorm + ReLU block evaluated from its weights."""
    conv, norm = block[0], block[1]
    x = F.conv2d(x, conv.weight.double(), padding=conv.padding)
    return F.relu(F.group_norm(x, norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps))


def reference_logits(head: UPerHead, features) -> torch.Tensor:
    """UperNet written out level by level (PPM on the coarsest level, FPN top-down, fuse at the finest), float64."""
    decoder = head.decoder
    p2, p3, p4, p5 = (level.double() for level in decoder.neck(features.maps).values())
    up = lambda x, like: F.interpolate(x, size=like.shape[-2:], mode='bilinear', align_corners=False)  # noqa: E731
    pooled = [up(conv_block(pool[1], F.adaptive_avg_pool2d(p5, pool[0].output_size)), p5) for pool in decoder.pools]
    top = conv_block(decoder.pool_fusion, torch.cat([p5, *pooled], dim=1))
    m4 = conv_block(decoder.laterals[2], p4) + up(top, p4)
    m3 = conv_block(decoder.laterals[1], p3) + up(m4, p3)
    m2 = conv_block(decoder.laterals[0], p2) + up(m3, p2)
    outs = [conv_block(decoder.smoothers[0], m2), conv_block(decoder.smoothers[1], m3),
            conv_block(decoder.smoothers[2], m4), top]
    fused = conv_block(decoder.fusion, torch.cat([outs[0]] + [up(x, outs[0]) for x in outs[1:]], dim=1))
    logits = F.conv2d(fused, decoder.predictor.weight.double(), decoder.predictor.bias.double())
    return F.interpolate(logits, size=features.image_size, mode='bilinear', align_corners=False)


def test_forward_matches_upernet_written_out(fake_features):
    head = make_head().double()
    features = fake_features(size=8, image_size=64)
    features.maps = [m.double() for m in features.maps]
    logits = head(features)
    assert logits.shape == (2, 5, 64, 64)
    torch.testing.assert_close(logits, reference_logits(head, features), rtol=1e-10, atol=1e-10)


def test_every_level_reaches_the_output(fake_features):
    head = make_head()
    head(fake_features(size=8)).sum().backward()
    # every parameter gets a gradient: no level or pooled branch is left out of the fusion
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_odd_map_sizes_and_three_level_pyramids(fake_features):
    # a DINOv2-like stride-14 grid: 16x16 map, levels at strides 7, 14, 28; and a 7x7 map that pools to 3x3
    three = make_head(neck=dict(out_channels=32, scale_factors=(2.0, 1.0, 0.5)))
    assert three(fake_features(size=16, image_size=224)).shape == (2, 5, 224, 224)
    assert make_head()(fake_features(size=7, image_size=56)).shape == (2, 5, 56, 56)


def test_parameter_count_is_upernets():
    c, w, k, levels, scales = 32, 48, 5, 4, 4  # neck width, decoder width, classes
    head = make_head(num_classes=k, neck=dict(NECK, out_channels=c), channels=w)
    conv_gn = lambda cin, cout, ks: cin * cout * ks * ks + 2 * cout  # noqa: E731  (bias-free conv + GN affine)
    decoder = (scales * conv_gn(c, w, 1) + conv_gn(c + scales * w, w, 3) + (levels - 1) * conv_gn(c, w, 1)
               + (levels - 1) * conv_gn(w, w, 3) + conv_gn(levels * w, w, 3) + w * k + k)
    neck = sum(p.numel() for p in head.decoder.neck.parameters())
    assert sum(p.numel() for p in head.parameters()) == decoder + neck


def test_loss_and_predictions_are_semantic_fpns(fake_features):
    head = make_head()
    logits = head(fake_features())
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (2, 64, 64), generator=generator)
    targets[torch.rand(2, 64, 64, generator=generator) < 0.3] = 255

    z = logits.detach().double().permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    labels = targets.reshape(-1).numpy()
    valid = labels != 255
    expected = -(z - np.log(np.exp(z).sum(1, keepdims=True)))[valid, labels[valid]].mean()
    assert head.loss(logits, targets)['loss_seg'].item() == pytest.approx(expected, rel=1e-5)
    assert head.loss_normalizer(targets, (64, 64)) == valid.sum()
    # a normaliser from the whole step (every rank and micro-batch) replaces this batch's pixel count
    total = head.loss(logits, targets, normalizer=torch.tensor(4 * valid.sum()))['loss_seg']
    assert total.item() == pytest.approx(expected / 4, rel=1e-5)
    assert torch.equal(head.predict(logits), logits.argmax(1))
    with pytest.raises(ValueError, match=r'class ids \[7\] outside 0..4'):
        head.loss(logits, torch.full((2, 64, 64), 7))


def test_built_from_the_registry_with_the_backbone_geometry(tiny_vit):
    head = MODELS.build(dict(type='UPerHead', num_classes=3, neck=dict(out_channels=32), channels=64),
                        default_args=dict(in_channels=tiny_vit.out_channels, in_strides=tiny_vit.out_strides))
    assert isinstance(head, SemanticFPNHead)
    assert head(tiny_vit(torch.randn(1, 3, 32, 32))).shape == (1, 3, 32, 32)  # batch 1: GroupNorm, not BatchNorm


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match='pool_scales'):
        make_head(pool_scales=())
    with pytest.raises(ValueError, match='one channel per group'):
        make_head(channels=32)
    make_head(channels=32, norm='LN')  # LayerNorm2d normalises over all channels
