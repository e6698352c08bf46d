import numpy as np
import pytest
import torch

from mtvision.models.heads.normals import NormalsHead, valid_normals


def make_head(in_channels=(32,), **kwargs) -> NormalsHead:
    torch.manual_seed(0)
    return NormalsHead(in_channels=list(in_channels), in_strides=[8], neck=dict(out_channels=32), channels=32,
                       **kwargs)


def unit_normals(batch=2, size=8, seed=0) -> torch.Tensor:
    vectors = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return vectors / vectors.norm(dim=1, keepdim=True)


def reference_loss(outputs, targets, kind):
    """Pixel by pixel with numpy: normalise both vectors, then 1 - cos or the L1 distance, mean over valid."""
    out, gt = outputs.detach().double().numpy(), targets.double().numpy()
    losses = []
    for b in range(out.shape[0]):
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                g = gt[b, :, i, j]
                if np.linalg.norm(g) <= 0.5:
                    continue
                p, g = out[b, :, i, j] / np.linalg.norm(out[b, :, i, j]), g / np.linalg.norm(g)
                losses.append(1 - p @ g if kind == 'cosine' else np.abs(p - g).sum())
    return np.mean(losses)


@pytest.mark.parametrize('kind', ['cosine', 'l1'])
def test_loss_matches_a_per_pixel_numpy_computation(kind, fake_features):
    head = make_head(loss=kind)
    outputs = head(fake_features(image_size=8))
    targets = unit_normals() * 0.9  # shortened by resizing: still valid, normalised before comparing
    targets[0, :, :3] = 0  # invalid rows
    targets[1, :, 5, 5] = torch.tensor([0.3, 0.0, 0.0])  # too short to be a normal
    loss = head.loss(outputs, targets)['loss_normals']
    assert loss.item() == pytest.approx(reference_loss(outputs, targets, kind), rel=1e-5)
    normalizer = head.loss_normalizer(targets, (8, 8))
    assert normalizer.item() == 2 * 64 - 3 * 8 - 1
    # the trainer's normaliser (a count over ranks and micro-batches) replaces the batch's own
    torch.testing.assert_close(head.loss(outputs, targets, normalizer=normalizer * 4)['loss_normals'], loss / 4)


def test_invalid_pixels_get_no_gradient():
    head = make_head()
    outputs = torch.randn(2, 3, 8, 8, requires_grad=True)
    targets = unit_normals()
    targets[:, :, 2:6, 2:6] = 0
    outputs.grad = None
    head.loss(outputs, targets)['loss_normals'].backward()
    assert not outputs.grad[:, :, 2:6, 2:6].any()
    assert outputs.grad[:, :, :2].abs().sum() > 0
    assert valid_normals(targets).sum() == 2 * (64 - 16)


def test_perfect_prediction_has_zero_loss_and_no_valid_pixel_a_zero_loss_in_the_graph():
    head = make_head(loss='l1')
    targets = unit_normals()
    assert head.loss(targets * 3.0, targets)['loss_normals'].item() == pytest.approx(0, abs=1e-6)
    outputs = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = head.loss(outputs, torch.zeros(2, 3, 8, 8))['loss_normals']
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert not outputs.grad.any()


def test_predict_returns_unit_normals_at_image_size(tiny_vit):
    head = make_head(tiny_vit.out_channels)
    outputs = head(tiny_vit(torch.randn(2, 3, 32, 32)))
    assert outputs.shape == (2, 3, 32, 32)
    normals = head.predict(outputs)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2, 32, 32))
    torch.testing.assert_close(normals * outputs.detach().norm(dim=1, keepdim=True), outputs.detach())


def test_bad_input():
    with pytest.raises(ValueError, match="loss must be one of .* got 'l2'"):
        make_head(loss='l2')
    head = make_head()
    with pytest.raises(ValueError, match=r'normals targets must be normals \[B, 3, H, W\], got shape \[2, 1, 8, 8\]'):
        head.loss_normalizer(torch.zeros(2, 1, 8, 8), (8, 8))
    with pytest.raises(ValueError, match=r'prediction \[2, 3, 4, 4\] and target \[2, 3, 8, 8\]'):
        head.loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize('kind', ['cosine', 'l1'])
def test_loss_falls_when_overfitting_one_batch(kind, fake_features):
    head = make_head(loss=kind)
    features = fake_features()
    # a floor (normal up, -y) under a wall facing the camera (-z), with a hole of missing normals
    targets = torch.zeros(2, 3, 64, 64)
    targets[:, 2, :32] = -1.0
    targets[:, 1, 32:] = -1.0
    targets[:, :, 20:30, 20:30] = 0
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = head.loss(head(features), targets)['loss_normals']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
