import dataclasses

import numpy as np
import pytest
import torch

from mtvision.models.backbones.vit import ViT
from mtvision.models.heads.mae import MAEHead, patchify, unpatchify
from mtvision.models.multitask import MultiTaskModel

PATCH = 8
NUM_PATCHES = 16  # a 32x32 image in 8x8 patches


def make_vit(**overrides) -> ViT:
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2) | overrides
    return ViT('vit_tiny_patch16_224', **kwargs).eval()


def make_head(**kwargs) -> MAEHead:
    torch.manual_seed(1)
    return MAEHead(in_channels=[32], in_strides=[PATCH], embed_dim=32, decoder_dim=32, decoder_heads=2, **kwargs)


def images(batch: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# MAE's len_keep = int(N * (1 - r)) worked out by hand for N = 16
@pytest.mark.parametrize('mask_ratio, visible', [(0.75, 4), (0.5, 8), (0.6, 6), (0.9, 1), (0.0, 16)])
def test_encoder_sees_exactly_len_keep_patches_and_the_mask_hides_the_rest(mask_ratio, visible):
    vit = make_vit()
    out = vit(images(batch=3), mask_ratio=mask_ratio)
    assert out.tokens.shape == (3, 1 + visible, 32)
    assert out.maps == []
    assert torch.equal((out.mask == 0).sum(dim=1), torch.full((3,), visible))
    assert torch.equal(out.mask.sum(dim=1), torch.full((3,), NUM_PATCHES - visible, dtype=out.mask.dtype))


def test_without_mask_ratio_the_forward_is_timms_forward_features_bit_for_bit():
    vit = make_vit()
    x = images()
    out = vit(x, mask_ratio=None)
    model = vit.model
    reference = model.forward_features(x)
    before_norm = model.blocks(model._pos_embed(model.patch_embed(x)))  # maps are the un-normed block outputs
    assert torch.equal(out.tokens, reference)
    assert torch.equal(out.maps[-1], before_norm[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4))
    assert torch.equal(out.pooled, reference[:, 1:].mean(dim=1))
    assert out.mask is None and out.ids_restore is None
    assert vit.patch_size == PATCH and vit.grid_size == (4, 4)


def test_masked_tokens_equal_timm_blocks_run_on_the_gathered_visible_tokens():
    vit = make_vit()
    model = vit.model
    x = images(batch=3)
    torch.manual_seed(7)
    out = vit(x, mask_ratio=0.75)

    torch.manual_seed(7)
    ids_shuffle = torch.rand(3, NUM_PATCHES).argsort(dim=1)
    ids_keep = ids_shuffle[:, :4]
    with torch.no_grad():
        patches = torch.nn.functional.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                                             stride=PATCH).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(3, -1, -1)
        visible = torch.stack([patches[b, ids_keep[b]] for b in range(3)])
        tokens = torch.cat([cls, visible], dim=1)
        for block in model.blocks:
            tokens = block(tokens)
        tokens = model.norm(tokens)

    torch.testing.assert_close(out.tokens, tokens)
    torch.testing.assert_close(out.cls_token, tokens[:, 0])
    torch.testing.assert_close(out.pooled, tokens[:, 1:].mean(dim=1))
    expected_mask = torch.ones(3, NUM_PATCHES)
    for b in range(3):
        expected_mask[b, ids_keep[b]] = 0
    assert torch.equal(out.mask, expected_mask)
    # ids_restore inverts the shuffle: the patch at shuffled position j sits at original position ids_shuffle[j]
    for b in range(3):
        assert torch.equal(out.ids_restore[b, ids_shuffle[b]], torch.arange(NUM_PATCHES))


def test_masking_draws_from_the_global_rng():
    vit = make_vit()
    x = images()
    torch.manual_seed(3)
    first = vit(x, mask_ratio=0.5).mask
    torch.manual_seed(3)
    assert torch.equal(vit(x, mask_ratio=0.5).mask, first)
    assert not torch.equal(vit(x, mask_ratio=0.5).mask, first)


@pytest.mark.parametrize('mask_ratio', [1.0, 0.97, -0.1])
def test_a_ratio_leaving_no_visible_patch_is_rejected(mask_ratio):
    with pytest.raises(ValueError, match='mask_ratio'):
        make_vit()(images(), mask_ratio=mask_ratio)


def test_patch_dropout_cannot_be_combined_with_masking():
    with pytest.raises(ValueError, match='patch_drop_rate'):
        make_vit(patch_drop_rate=0.5)(images(), mask_ratio=0.5)


def test_patchify_follows_maes_pixel_order_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 16, 24)
    patches = patchify(x, 8)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    # patch 4 is row 1, column 1; MAE flattens its pixels as (row, column, channel)
    expected = x[1, :, 8:16, 8:16].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, 4], expected)
    assert torch.equal(unpatchify(patches, 8, (2, 3)), x)
    with pytest.raises(ValueError, match='multiple of the patch size 8'):
        patchify(torch.zeros(1, 3, 12, 16), 8)


def test_decoder_position_table_is_maes_sincos_table_with_its_halves_swapped():
    def sincos_1d(dim, positions):  # MAE's get_1d_sincos_pos_embed_from_grid
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum('m,d->md', positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    h, w, dim = 2, 3, 16
    grid = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    column_half, row_half = sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])
    head = MAEHead(in_channels=[32], in_strides=[8], embed_dim=32, decoder_dim=dim, grid_size=(h, w))
    np.testing.assert_allclose(head.decoder_pos_embed.numpy(), np.concatenate([row_half, column_half], 1), atol=1e-6)


def masked_outputs(head: MAEHead, mask_ratio: float = 0.75, batch: int = 2):
    torch.manual_seed(5)
    return head(make_vit()(images(batch), mask_ratio=mask_ratio))


def test_loss_is_the_mse_of_the_masked_patches_and_ignores_the_visible_ones():
    head = make_head()
    outputs = masked_outputs(head)
    targets = images()
    loss = head.loss(outputs, targets)['loss_mae']

    pred, mask = outputs['pred'].detach().double().numpy(), outputs['mask'].numpy().astype(bool)
    target = targets.double().numpy().reshape(2, 3, 4, 8, 4, 8).transpose(0, 2, 4, 3, 5, 1).reshape(2, 16, 192)
    assert loss.item() == pytest.approx(((pred - target) ** 2).mean(-1)[mask].mean(), rel=1e-5)

    visible = (outputs['mask'][0] == 0).nonzero()[0, 0]
    masked = (outputs['mask'][0] == 1).nonzero()[0, 0]
    changed_visible = outputs['pred'].detach().clone()
    changed_visible[0, visible] += 10
    assert head.loss(dict(outputs, pred=changed_visible), targets)['loss_mae'] == loss
    changed_masked = outputs['pred'].detach().clone()
    changed_masked[0, masked] += 10
    assert head.loss(dict(outputs, pred=changed_masked), targets)['loss_mae'] > loss + 1


def test_norm_pix_loss_target_is_each_patch_normalised_by_its_own_statistics():
    head = make_head(norm_pix_loss=True)
    outputs = masked_outputs(head)
    targets = images() * 3 + 1
    loss = head.loss(outputs, targets)['loss_mae']

    pred, mask = outputs['pred'].detach().double().numpy(), outputs['mask'].numpy().astype(bool)
    target = np.empty((2, 16, 192))
    for b in range(2):
        for row in range(4):
            for col in range(4):
                patch = targets[b, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8].double().numpy()
                values = patch.transpose(1, 2, 0).reshape(-1)
                target[b, row * 4 + col] = (values - values.mean()) / np.sqrt(values.var(ddof=1) + 1e-6)
    assert loss.item() == pytest.approx(((pred - target) ** 2).mean(-1)[mask].mean(), rel=1e-5)


def test_predict_gives_the_reconstruction_and_the_pixel_mask_of_the_hidden_patches():
    head = make_head()
    outputs = masked_outputs(head)
    predictions = head.predict(outputs)
    assert torch.equal(patchify(predictions['images'], PATCH), outputs['pred'].detach())
    pixel_mask = predictions['mask']
    assert pixel_mask.shape == (2, 1, 32, 32)
    for y, x in [(0, 0), (5, 17), (31, 31), (12, 30)]:
        assert pixel_mask[1, 0, y, x] == outputs['mask'][1, (y // PATCH) * 4 + x // PATCH]


def test_head_rejects_features_of_an_unmasked_forward():
    with pytest.raises(ValueError, match='mask_ratio=head.mask_ratio'):
        make_head()(make_vit()(images()))


def test_wrong_targets_are_rejected():
    head = make_head()
    with pytest.raises(ValueError, match=r'input images of shape \[2, 3, 32, 32\]'):
        head.loss(masked_outputs(head), torch.zeros(2, 3, 16, 16))


def test_decoder_output_depends_on_the_patch_position():
    # the same visible tokens under another shuffle must reconstruct other patches: positions reach the decoder
    head = make_head()
    features = make_vit()(images(), mask_ratio=0.75)
    swapped = features.ids_restore.flip(1)
    moved = head(dataclasses.replace(features, ids_restore=swapped, mask=features.mask.flip(1)))['pred']
    assert not torch.allclose(moved.flip(1), head(features)['pred'], atol=1e-4)


def test_multitask_model_masks_for_the_mae_head_and_trains_it_on_one_batch():
    torch.manual_seed(0)
    model = MultiTaskModel(
        backbone=dict(type='ViT', model_name='vit_tiny_patch16_224', img_size=32, patch_size=PATCH, embed_dim=32,
                      depth=2, num_heads=2),
        heads=dict(mae=dict(type='MAEHead', decoder_dim=32, decoder_heads=2, mask_ratio=0.75)))
    assert model.heads['mae'].patch_size == PATCH
    x = images(batch=4)
    batch = dict(images=x, targets=x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):  # random images: only memorising them per position lowers the loss, which takes a while
        loss = model.loss('mae', batch)['loss_mae']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
