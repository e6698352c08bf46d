import numpy as np
import pytest
import torch

from mtvision.models.heads.depth import DepthHead, images_with_depth, silog_loss


def make_head(in_channels=(32,), **kwargs) -> DepthHead:
    torch.manual_seed(0)
    return DepthHead(in_channels=list(in_channels), in_strides=[8], neck=dict(out_channels=32), channels=32, **kwargs)


def test_silog_matches_a_numpy_hand_computation_per_image_with_invalid_pixels():
    predicted = np.array([[1.0, 2.0, 3.5], [0.5, 4.0, 2.0], [1.0, 1.0, 1.0]])  # three images of three pixels
    ground_truth = np.array([[1.2, 0.0, 3.0], [0.0005, 5.0, np.inf], [0.0, 0.0, 0.0]])  # 0, <= min_depth, inf invalid
    valid = np.array([[True, False, True], [False, True, False], [False, False, False]])
    per_image = []
    for image in range(2):  # the third has no valid pixel: it adds nothing and is not counted
        d = np.log(predicted[image][valid[image]]) - np.log(ground_truth[image][valid[image]])
        per_image.append(10 * np.sqrt(np.mean(d ** 2) - 0.85 * np.mean(d) ** 2))

    loss = silog_loss(torch.tensor(predicted).log(), torch.tensor(ground_truth, dtype=torch.float32), min_depth=1e-3)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(np.mean(per_image), rel=1e-5)
    # with a normaliser (the trainer's count of images over ranks and micro-batches) the sum is divided by it
    target = torch.tensor(ground_truth, dtype=torch.float32)
    assert silog_loss(torch.tensor(predicted).log(), target, normalizer=5.0).item() == pytest.approx(
        np.sum(per_image) / 5, rel=1e-5)
    assert images_with_depth(target) == 2


def test_batch_loss_is_the_normalised_sum_of_its_parts():
    """Two halves of a batch, each divided by the whole batch's image count, add up to the whole batch's loss and
    gradient: what makes data-parallel ranks and accumulated micro-batches train like one batch."""
    log_depth, target = torch.randn(6, 1, 8, 8, requires_grad=True), torch.rand(6, 1, 8, 8) * 5 + 0.5
    target[1, :, :4] = 0  # some invalid pixels
    target[4] = 0  # an image with none
    whole = silog_loss(log_depth, target)
    (whole_grad,) = torch.autograd.grad(whole, log_depth)
    normalizer = images_with_depth(target)
    parts = sum(silog_loss(log_depth[half], target[half], normalizer=normalizer)
                for half in (slice(0, 3), slice(3, 6)))
    (parts_grad,) = torch.autograd.grad(parts, log_depth)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(parts_grad, whole_grad)


def test_full_variance_focus_makes_the_loss_blind_to_a_global_scale():
    log_depth, target = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 8, 8) * 5 + 0.5
    unscaled = silog_loss(log_depth, target, variance_focus=1.0)
    torch.testing.assert_close(silog_loss(log_depth + np.log(3.0), target, variance_focus=1.0), unscaled)
    assert not torch.allclose(silog_loss(log_depth + np.log(3.0), target), silog_loss(log_depth, target))


def test_perfect_prediction_has_zero_loss_and_finite_gradients():
    target = torch.rand(1, 1, 4, 4) + 0.5
    log_depth = target.log().requires_grad_()
    loss = silog_loss(log_depth, target)
    loss.backward()
    assert loss.item() == pytest.approx(0, abs=1e-4) and torch.isfinite(log_depth.grad).all()


def test_no_valid_pixel_gives_a_zero_loss_in_the_graph():
    log_depth = torch.randn(1, 1, 4, 4, requires_grad=True)
    loss = silog_loss(log_depth, torch.zeros(1, 1, 4, 4))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert not log_depth.grad.any()


def test_mixed_precision_input_is_computed_in_float32():
    log_depth, target = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 8, 8) * 5 + 0.5
    half = log_depth.bfloat16()
    loss = silog_loss(half, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, silog_loss(half.float(), target))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r'\[1, 1, 4, 4\] and target \[1, 4, 4\]'):
        silog_loss(torch.zeros(1, 1, 4, 4), torch.ones(1, 4, 4))


def test_head_outputs_log_depth_at_image_size_and_predicts_clamped_metres(tiny_vit):
    head = make_head(tiny_vit.out_channels, min_depth=0.1, max_depth=10.0)
    log_depth = head(tiny_vit(torch.randn(2, 3, 32, 32)))
    assert log_depth.shape == (2, 1, 32, 32)
    torch.testing.assert_close(head.predict(log_depth), log_depth.detach().exp().clamp(0.1, 10.0))
    extremes = torch.tensor([-20.0, 0.0, 20.0]).reshape(1, 1, 1, 3)
    torch.testing.assert_close(head.predict(extremes), torch.tensor([0.1, 1.0, 10.0]).reshape(1, 1, 1, 3))


def test_head_loss_uses_its_min_depth_and_constants(fake_features):
    head = make_head(min_depth=1.0, variance_focus=0.5, loss_scale=2.0)
    log_depth = head(fake_features())
    target = torch.rand(2, 1, 64, 64) * 4
    expected = silog_loss(log_depth, target, min_depth=1.0, variance_focus=0.5, scale=2.0)
    torch.testing.assert_close(head.loss(log_depth, target)['loss_silog'], expected)


def test_loss_falls_when_overfitting_one_batch(fake_features):
    head = make_head()
    features = fake_features()
    # A smooth depth ramp with a hole of invalid pixels.
    rows = torch.linspace(1.0, 8.0, 64).reshape(1, 1, 64, 1)
    target = (rows * torch.linspace(0.5, 1.5, 64).reshape(1, 1, 1, 64)).repeat(2, 1, 1, 1)
    target[:, :, 20:30, 20:30] = 0
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = head.loss(head(features), target)['loss_silog']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10
