import pytest
import torch

from mtvision.models.backbones.swin import Swin

IMAGE = 64
PATCH = 4
GRID = IMAGE // PATCH  # 16x16 patch-embedding grid
# window 4 on a 16x16 and an 8x8 grid: the second block of those stages runs shifted windows
TINY = dict(img_size=IMAGE, window_size=4, embed_dim=24, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4),
            drop_path_rate=0.0)
NAMES = ['swin_tiny_patch4_window7_224', 'swin_s3_tiny_224', 'swinv2_tiny_window8_256']


def make_swin(model_name: str = NAMES[0], **kwargs) -> Swin:
    torch.manual_seed(0)
    return Swin(model_name, **(TINY | kwargs)).eval()


def images(batch: int = 2, seed: int = 1, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def timm_reference(swin: Swin, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every stage's output (NHWC -> NCHW by hand) and the final normed NHWC tokens, stage by stage."""
    model = swin.model
    with torch.no_grad():
        h = model.patch_embed(x)
        stages = []
        for stage in model.layers:
            h = stage(h)
            stages.append(torch.einsum('bhwc->bchw', h))
        final = model.forward_features(x)
    return stages, final


@pytest.mark.parametrize('model_name', NAMES)
@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (-1, 1)])
def test_maps_have_the_declared_channels_and_strides(model_name, out_indices):
    swin = make_swin(model_name, out_indices=out_indices)
    with torch.no_grad():
        out = swin(images(batch=3))
    assert len(out.maps) == len(swin.out_channels) == len(swin.out_strides)
    for feature_map, channels, stride in zip(out.maps, swin.out_channels, swin.out_strides):
        assert feature_map.shape == (3, channels, IMAGE // stride, IMAGE // stride)
    stages = sorted(i % 4 for i in out_indices)
    assert swin.out_strides == [PATCH * 2 ** i for i in stages]  # 4, 8, 16, 32
    assert swin.out_channels == [24 * 2 ** i for i in stages]
    assert swin.embed_dim == 24 * 2 ** 3 == out.tokens.shape[-1] == out.pooled.shape[-1]
    assert swin.patch_size == PATCH and swin.grid_size == (GRID, GRID)
    assert swin.num_prefix_tokens == 0 and not swin.has_cls_token


@pytest.mark.parametrize('model_name', NAMES)
def test_forward_equals_timm_stages_run_one_by_one(model_name):
    swin = make_swin(model_name)
    x = images()
    with torch.no_grad():
        out = swin(x)
    stages, final = timm_reference(swin, x)
    assert len(out.maps) == 4
    for feature_map, reference in zip(out.maps, stages):
        assert torch.equal(feature_map, reference)
    batch, height, width, channels = final.shape
    flat = torch.stack([final[:, i // width, i % width] for i in range(height * width)], dim=1)  # row-major
    assert torch.equal(out.tokens, flat)
    torch.testing.assert_close(out.pooled, final.mean(dim=(1, 2)))
    assert out.cls_token is None and out.mask is None and out.ids_restore is None
    assert out.image_size == (IMAGE, IMAGE)


def test_mask_ratio_zero_is_the_unmasked_forward():
    swin = make_swin(mask_patch_size=16)
    x = images()
    with torch.no_grad():
        plain, masked = swin(x), swin(x, mask_ratio=0.0)
    assert not masked.mask.any() and masked.mask.shape == (2, GRID * GRID)
    assert len(masked.maps) == len(plain.maps) == 4
    for a, b in zip(masked.maps, plain.maps):
        assert torch.equal(a, b)
    assert torch.equal(masked.tokens, plain.tokens) and torch.equal(masked.pooled, plain.pooled)
    assert masked.ids_restore is None


# int(M * ratio) worked out by hand, M = (64 / mask_patch_size) ** 2
@pytest.mark.parametrize('mask_patch_size, mask_ratio, num_masked', [
    (32, 0.6, 2), (32, 0.9, 3), (16, 0.6, 9), (16, 0.75, 12), (16, 0.5, 8), (8, 0.6, 38), (4, 0.6, 153)])
def test_exactly_int_m_ratio_squares_are_masked_and_masks_are_aligned_to_them(mask_patch_size, mask_ratio,
                                                                              num_masked):
    swin = make_swin(mask_patch_size=mask_patch_size)
    with torch.no_grad():
        out = swin(images(batch=4), mask_ratio=mask_ratio)
    scale = mask_patch_size // PATCH
    side = GRID // scale
    grid = out.mask.reshape(4, GRID, GRID)
    for b in range(4):
        squares = []
        for i in range(side):
            for j in range(side):
                block = grid[b, i * scale:(i + 1) * scale, j * scale:(j + 1) * scale]
                assert block.min() == block.max(), 'a mask square is partly masked'
                squares.append(int(block[0, 0]))
        assert sum(squares) == num_masked
    assert len(out.maps) == 4 and out.mask.dtype == torch.float32


def test_the_mask_is_drawn_from_the_global_rng_as_documented():
    swin = make_swin(mask_patch_size=16)
    torch.manual_seed(3)
    with torch.no_grad():
        out = swin(images(batch=3), mask_ratio=0.6)
    torch.manual_seed(3)
    ranks = torch.rand(3, 16).argsort(dim=1)
    for b in range(3):
        masked_squares = set(ranks[b, :9].tolist())
        for index in range(GRID * GRID):
            row, col = divmod(index, GRID)
            square = (row // 4) * 4 + col // 4
            assert out.mask[b, index] == (1.0 if square in masked_squares else 0.0)


def test_masked_forward_runs_the_stages_on_embeddings_with_mask_tokens_written_in():
    swin = make_swin(mask_patch_size=16)
    x = images()
    torch.manual_seed(5)
    with torch.no_grad():
        out = swin(x, mask_ratio=0.5)
        model = swin.model
        h = model.patch_embed(x).clone()
        for b in range(2):
            for index in range(GRID * GRID):
                if out.mask[b, index]:
                    h[b, index // GRID, index % GRID] = swin.mask_token[0, 0]
        stages = []
        for stage in model.layers:
            h = stage(h)
            stages.append(h.permute(0, 3, 1, 2))
        tokens = model.norm(h).reshape(2, -1, swin.embed_dim)
    for feature_map, reference in zip(out.maps, stages):
        torch.testing.assert_close(feature_map, reference)
    torch.testing.assert_close(out.tokens, tokens)


def test_the_encoder_never_sees_masked_pixels():
    swin = make_swin(mask_patch_size=16)
    x = images()
    torch.manual_seed(11)
    with torch.no_grad():
        out = swin(x, mask_ratio=0.6)
    pixel_mask = torch.zeros(2, IMAGE, IMAGE, dtype=torch.bool)
    for b in range(2):
        for index in range(GRID * GRID):
            row, col = divmod(index, GRID)
            pixel_mask[b, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH] = bool(out.mask[b, index])
    pixel_mask = pixel_mask.unsqueeze(1).expand(-1, 3, -1, -1)

    changed = torch.where(pixel_mask, 100 * torch.randn_like(x), x)
    torch.manual_seed(11)
    with torch.no_grad():
        again = swin(changed, mask_ratio=0.6)
    assert torch.equal(again.mask, out.mask)
    for a, b in zip(again.maps, out.maps):
        assert torch.equal(a, b)
    assert torch.equal(again.tokens, out.tokens)

    # the same change under visible pixels does reach the output
    visible_changed = torch.where(~pixel_mask, 100 * torch.randn_like(x), x)
    torch.manual_seed(11)
    with torch.no_grad():
        third = swin(visible_changed, mask_ratio=0.6)
    assert not torch.allclose(third.tokens, out.tokens)


def test_mask_token_gets_gradients_only_from_masked_forwards():
    swin = make_swin(mask_patch_size=16).train()
    x = images()
    out = swin(x)
    (sum(m.square().mean() for m in out.maps) + out.tokens.square().mean()).backward()
    assert swin.mask_token.grad is None
    assert swin.model.patch_embed.proj.weight.grad.abs().sum() > 0

    swin.zero_grad(set_to_none=True)
    out = swin(x, mask_ratio=0.6)
    (sum(m.square().mean() for m in out.maps) + out.tokens.square().mean()).backward()
    assert swin.mask_token.grad is not None and swin.mask_token.grad.abs().sum() > 0
    assert swin.mask_token.shape == (1, 1, 24)


def test_no_weight_decay_names_the_relative_position_tables_and_the_mask_token():
    swin = make_swin()
    names = dict(swin.named_parameters())
    tables = {name for name in names if name.endswith('relative_position_bias_table')}
    assert len(tables) == 6  # one per block: depths (2, 2, 1, 1)
    assert swin.no_weight_decay() == tables | {'mask_token'}


@pytest.mark.parametrize('mask_ratio', [1.0, -0.1, 1.5])
def test_mask_ratio_outside_zero_one_is_refused(mask_ratio):
    swin = make_swin()
    with pytest.raises(ValueError, match=f'mask_ratio must be in \\[0, 1\\), got {mask_ratio}'):
        swin(images(), mask_ratio=mask_ratio)


@pytest.mark.parametrize('mask_patch_size', [6, 0, 2])
def test_mask_patch_size_must_be_a_multiple_of_the_patch_size(mask_patch_size):
    with pytest.raises(ValueError, match=f'multiple of the patch size 4, got {mask_patch_size}'):
        make_swin(mask_patch_size=mask_patch_size)


def test_images_not_divisible_by_the_mask_patch_size_are_refused():
    swin = make_swin(img_size=80, window_size=5, depths=(1, 1, 1), num_heads=(1, 2, 2), mask_patch_size=32,
                     out_indices=(0, 1, 2))
    with torch.no_grad():
        assert len(swin(images(size=80)).maps) == 3  # fine unmasked
        with pytest.raises(ValueError, match='image size 80x80 is not a multiple of mask_patch_size 32'):
            swin(images(size=80), mask_ratio=0.5)


def test_bad_out_indices_and_non_swin_models_are_refused():
    with pytest.raises(ValueError, match=r'out_indices \(0, 4\) out of range .* 4 stages'):
        make_swin(out_indices=(0, 4))
    with pytest.raises(ValueError, match="'vit_tiny_patch16_224' builds a VisionTransformer, not a timm Swin"):
        Swin('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
