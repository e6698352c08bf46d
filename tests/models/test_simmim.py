import pytest
import torch

from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.backbones.swin import Swin
from mtvision.models.backbones.vit import ViT
from mtvision.models.heads.simmim import SimMIMHead, upsample_patch_mask
from mtvision.models.multitask import MultiTaskModel

IMAGE = 64
SWIN = dict(type='Swin', model_name='swin_tiny_patch4_window7_224', img_size=IMAGE, window_size=4, embed_dim=24,
            depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), drop_path_rate=0.0, mask_patch_size=16)


def make_model(mask_ratio: float = 0.6) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(backbone=SWIN, heads=dict(simmim=dict(type='SimMIMHead', mask_ratio=mask_ratio)))


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def make_head(**kwargs) -> SimMIMHead:
    torch.manual_seed(2)
    return SimMIMHead(in_channels=[24, 48, 96, 192], in_strides=[4, 8, 16, 32], embed_dim=192, **kwargs)


def random_outputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.rand(2, 1, 8, 8, generator=generator) < 0.5).float()
    return dict(pred=torch.randn(2, 3, 8, 8, generator=generator), mask=mask, image_size=(8, 8))


def test_loss_ignores_the_prediction_on_visible_pixels():
    head = make_head()
    outputs = random_outputs()
    targets = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    loss = head.loss(outputs, targets)['loss_simmim']
    visible = (outputs['mask'] == 0).expand(-1, 3, -1, -1)
    noise = 50 * torch.randn(2, 3, 8, 8)
    changed_visible = dict(outputs, pred=torch.where(visible, noise, outputs['pred']))
    assert torch.equal(head.loss(changed_visible, targets)['loss_simmim'], loss)
    changed_masked = dict(outputs, pred=torch.where(visible, outputs['pred'], noise))
    assert head.loss(changed_masked, targets)['loss_simmim'] > loss


def test_loss_is_the_mean_absolute_error_over_masked_pixels_and_channels():
    head = make_head()
    # one 2x2 image, two of its four pixels masked: |pred - target| on them is 1, 2, 3 and 4, 5, 6 per channel
    pred = torch.zeros(1, 3, 2, 2)
    targets = torch.zeros(1, 3, 2, 2)
    targets[0, :, 0, 1] = torch.tensor([1.0, -2.0, 3.0])
    targets[0, :, 1, 0] = torch.tensor([-4.0, 5.0, 6.0])
    targets[0, :, 0, 0] = 100.0  # visible
    mask = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    loss = head.loss(dict(pred=pred, mask=mask, image_size=(2, 2)), targets)['loss_simmim']
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(21 / (2 + 1e-5) / 3, rel=1e-6)

    half = head.loss(dict(pred=pred.bfloat16(), mask=mask.bool(), image_size=(2, 2)), targets.bfloat16())
    assert half['loss_simmim'].dtype == torch.float32
    assert half['loss_simmim'].item() == pytest.approx(21 / (2 + 1e-5) / 3, rel=1e-6)


def test_loss_refuses_targets_that_are_not_the_images():
    head = make_head()
    with pytest.raises(ValueError, match=r'simmim targets must be the input images of shape \[2, 3, 8, 8\]'):
        head.loss(random_outputs(), torch.zeros(2, 3, 4, 4))


def test_pixel_mask_is_the_patch_mask_upsampled_and_predict_has_the_mae_format():
    model = make_model()
    torch.manual_seed(4)
    with torch.no_grad():
        features = model.backbone(images(batch=3), mask_ratio=0.6)
        outputs = model.heads['simmim'](features)
        predictions = model.heads['simmim'].predict(outputs)
    assert outputs['pred'].shape == (3, 3, IMAGE, IMAGE) and outputs['image_size'] == (IMAGE, IMAGE)
    grid = IMAGE // 4
    expected = torch.zeros(3, 1, IMAGE, IMAGE)
    for b in range(3):
        for y in range(IMAGE):
            for x in range(IMAGE):
                expected[b, 0, y, x] = features.mask[b, (y // 4) * grid + x // 4]
    assert torch.equal(outputs['mask'], expected)
    assert int(expected[0].sum()) == int(16 * 0.6) * 16 * 16  # 9 of 16 mask squares of 16x16 pixels
    assert torch.equal(predictions['mask'], expected) and predictions['mask'].dtype == torch.float32
    assert torch.equal(predictions['images'], outputs['pred'])


def test_upsample_patch_mask_refuses_a_mask_that_does_not_tile_the_image():
    with pytest.raises(ValueError, match='a mask over 10 patches does not tile a 64x64 image'):
        upsample_patch_mask(torch.zeros(2, 10), (64, 64))


def test_prediction_is_a_1x1_conv_of_the_last_map_shuffled_to_pixels():
    head = make_head()
    generator = torch.Generator().manual_seed(3)
    last = torch.randn(1, 192, 2, 2, generator=generator)
    features = BackboneOutput(maps=[last], tokens=last.flatten(2).transpose(1, 2), cls_token=None,
                              pooled=last.mean(dim=(2, 3)), image_size=(IMAGE, IMAGE), mask=torch.zeros(1, 256))
    with torch.no_grad():
        pred = head(features)['pred']
    conv = head.decoder[0]
    weight, bias = conv.weight[:, :, 0, 0], conv.bias
    for c, y, x in [(0, 0, 0), (1, 5, 40), (2, 63, 63), (0, 33, 7), (2, 31, 32)]:
        # channel c of pixel (y, x) is output c * s * s + (y % s) * s + (x % s) of the cell (y // s, x // s)
        s = 32
        row = c * s * s + (y % s) * s + (x % s)
        expected = weight[row] @ last[0, :, y // s, x // s] + bias[row]
        torch.testing.assert_close(pred[0, c, y, x], expected)


def test_head_refuses_unmasked_features_and_masked_forwards_without_maps(fake_features):
    head = make_head()
    with pytest.raises(ValueError, match='SimMIMHead needs a masked backbone forward'):
        head(fake_features())
    torch.manual_seed(0)
    vit = ViT('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    with torch.no_grad():
        features = vit(torch.randn(2, 3, 32, 32), mask_ratio=0.5)
    with pytest.raises(ValueError, match='a ViT masked forward .* has no full grid'):
        head(features)


def test_multitask_model_masks_with_the_heads_ratio():
    model = make_model(mask_ratio=0.75)
    with torch.no_grad():
        features = model.features('simmim', images())
    assert torch.equal(features.mask.sum(dim=1), torch.full((2,), 12.0 * 16))  # int(16 * 0.75) squares of 4x4 patches
    assert model.heads['simmim'].mask_ratio == 0.75
    assert isinstance(model.backbone, Swin)
    with pytest.raises(ValueError, match=r'mask_ratio must be in \[0, 1\), got 1.0'):
        SimMIMHead(in_channels=[8], in_strides=[4], embed_dim=8, mask_ratio=1.0)


def test_training_steps_on_a_fixed_batch_reduce_the_loss_and_train_the_mask_token():
    model = make_model()
    batch = dict(images=images(), targets=images())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for step in range(12):
        torch.manual_seed(123)  # the same mask every step
        loss = model.loss('simmim', batch)['loss_simmim']
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert model.backbone.mask_token.grad.abs().sum() > 0
            assert model.backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0
            assert model.heads['simmim'].decoder[0].weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
