import numpy as np
import pytest
import torch

from mtvision.models.heads.segmentation import SemanticFPNHead


def make_head(num_classes: int = 4, in_channels=(32,)) -> SemanticFPNHead:
    torch.manual_seed(0)
    return SemanticFPNHead(num_classes=num_classes, in_channels=list(in_channels), in_strides=[8],
                           neck=dict(out_channels=32), channels=32)


def random_targets(shape, num_classes: int, ignored_fraction: float = 0.3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, num_classes, shape, generator=generator)
    targets[torch.rand(shape, generator=generator) < ignored_fraction] = 255
    return targets


def test_outputs_and_predictions_have_the_image_size(tiny_vit):
    head = make_head(in_channels=tiny_vit.out_channels)
    logits = head(tiny_vit(torch.randn(2, 3, 32, 32)))
    assert logits.shape == (2, 4, 32, 32)
    predictions = head.predict(logits)
    assert predictions.dtype == torch.int64 and torch.equal(predictions, logits.argmax(1))


def test_odd_map_sizes_still_reach_the_image_size(fake_features):
    # 56x56 images with patch 8: the 7x7 map pools to 3x3, which 2x upsampling cannot bring back to 14x14.
    logits = make_head()(fake_features(size=7, image_size=56))
    assert logits.shape == (2, 4, 56, 56)


def test_loss_is_the_mean_cross_entropy_over_non_ignored_pixels(fake_features):
    head = make_head()
    logits = head(fake_features())
    targets = random_targets((2, 64, 64), 4)

    z = logits.detach().double().permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    labels = targets.reshape(-1).numpy()
    valid = labels != 255
    log_probs = z - np.log(np.exp(z).sum(1, keepdims=True))
    expected = -log_probs[valid, labels[valid]].mean()

    assert head.loss(logits, targets)['loss_seg'].item() == pytest.approx(expected, rel=1e-5)


def test_logits_at_ignored_pixels_do_not_change_the_loss(fake_features):
    head = make_head()
    logits = head(fake_features()).detach()
    targets = random_targets((2, 64, 64), 4)
    ignored = (targets == 255).unsqueeze(1).expand_as(logits)
    loss = head.loss(logits, targets)['loss_seg']

    noisy_where_ignored = torch.where(ignored, logits + 10 * torch.randn_like(logits), logits)
    torch.testing.assert_close(head.loss(noisy_where_ignored, targets)['loss_seg'], loss)
    noisy_where_valid = torch.where(ignored, logits, logits + 10 * torch.randn_like(logits))
    assert not torch.allclose(head.loss(noisy_where_valid, targets)['loss_seg'], loss)


def test_fully_ignored_batch_gives_a_zero_loss_in_the_graph(fake_features):
    head = make_head()
    loss = head.loss(head(fake_features()), torch.full((2, 64, 64), 255))['loss_seg']
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())


@pytest.mark.parametrize('targets, message', [
    (torch.full((2, 64, 64), 7), r'class ids \[7\] outside 0..3'),
    (torch.zeros(2, 32, 32, dtype=torch.long), r'shape \[2, 64, 64\]'),
])
def test_bad_targets_are_rejected(fake_features, targets, message):
    head = make_head()
    with pytest.raises(ValueError, match=message):
        head.loss(head(fake_features()), targets)


def test_loss_falls_when_overfitting_one_batch(fake_features):
    head = make_head()
    features = fake_features()
    # Blocky masks: one class per 16x16 tile, which the stride-4 decoder can represent.
    tiles = torch.randint(0, 4, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    targets = tiles.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = head.loss(head(features), targets)['loss_seg']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10
