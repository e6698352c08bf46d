import dataclasses

import numpy as np
import pytest
import torch

from mtvision.models.heads.classification import ClassificationHead


def test_loss_matches_cross_entropy_with_label_smoothing_in_numpy(fake_features):
    head = ClassificationHead(num_classes=5, embed_dim=32, label_smoothing=0.2)
    logits = head(fake_features(batch=4))
    targets = torch.tensor([0, 3, 4, 1])

    z = logits.detach().double().numpy()
    log_probs = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    smoothed = np.full_like(z, 0.2 / 5)
    smoothed[np.arange(4), targets.numpy()] += 0.8
    expected = -(smoothed * log_probs).sum(1).mean()

    assert head.loss(logits, targets)['loss_cls'].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('feature, used, unused', [('cls', 'cls_token', 'pooled'), ('avg', 'pooled', 'cls_token')])
def test_feature_selects_the_token_the_classifier_reads(fake_features, feature, used, unused):
    head = ClassificationHead(num_classes=3, embed_dim=32, feature=feature)
    features = fake_features()
    logits = head(features)
    changed_unused = dataclasses.replace(features, **{unused: torch.randn(2, 32)})
    changed_used = dataclasses.replace(features, **{used: torch.randn(2, 32)})
    torch.testing.assert_close(head(changed_unused), logits)
    assert not torch.allclose(head(changed_used), logits)


def test_cls_feature_without_class_token_names_the_fix(fake_features):
    features = dataclasses.replace(fake_features(), cls_token=None)
    with pytest.raises(ValueError, match="feature='avg'"):
        ClassificationHead(num_classes=3, embed_dim=32)(features)


def test_predict_gives_probabilities_ranked_like_the_logits(fake_features):
    head = ClassificationHead(num_classes=6, embed_dim=32)
    logits = head(fake_features(batch=3))
    probabilities = head.predict(logits)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3))
    assert torch.equal(probabilities.argmax(1), logits.argmax(1))


def test_wrong_target_shape_is_rejected(fake_features):
    head = ClassificationHead(num_classes=3, embed_dim=32)
    with pytest.raises(ValueError, match=r'shape \[2\]'):
        head.loss(head(fake_features()), torch.zeros(2, 3, dtype=torch.long))


def test_loss_falls_when_overfitting_one_batch(fake_features):
    torch.manual_seed(0)
    head = ClassificationHead(num_classes=5, embed_dim=32, dropout=0.1)
    features, targets = fake_features(batch=8), torch.randint(0, 5, (8,))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = head.loss(head(features), targets)['loss_cls']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def _numpy_soft_cross_entropy(logits: torch.Tensor, targets: np.ndarray) -> float:
    z = logits.detach().double().numpy()
    log_probs = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    return float(-(targets * log_probs).sum(1).mean())


def test_soft_targets_give_the_batch_mean_of_soft_cross_entropy(fake_features):
    head = ClassificationHead(num_classes=5, embed_dim=32)
    logits = head(fake_features(batch=4))
    targets = torch.tensor([[0.7, 0.3, 0, 0, 0], [0, 0, 1.0, 0, 0], [0.25, 0, 0, 0.5, 0.25], [0, 0.4, 0, 0, 0.6]])

    expected = _numpy_soft_cross_entropy(logits, targets.double().numpy())
    assert head.loss(logits, targets)['loss_cls'].item() == pytest.approx(expected, rel=1e-5)


def test_one_hot_soft_targets_give_the_hard_loss(fake_features):
    head = ClassificationHead(num_classes=5, embed_dim=32, label_smoothing=0.1)
    logits = head(fake_features(batch=4))
    hard = torch.tensor([0, 3, 4, 1])
    soft = torch.nn.functional.one_hot(hard, 5).float()
    assert head.loss(logits, soft)['loss_cls'].item() == pytest.approx(head.loss(logits, hard)['loss_cls'].item(),
                                                                       rel=1e-6)


@pytest.mark.parametrize('targets', [torch.tensor([0, 1, 2, 3]), torch.tensor([[0.7, 0.3, 0, 0, 0]] * 4)])
def test_label_smoothing_is_torch_cross_entropy_on_hard_and_soft_targets(fake_features, targets):
    head = ClassificationHead(num_classes=5, embed_dim=32, label_smoothing=0.3)
    logits = head(fake_features(batch=4))
    expected = torch.nn.functional.cross_entropy(logits.double(), targets if targets.dtype == torch.int64
                                                 else targets.double(), label_smoothing=0.3)
    assert head.loss(logits, targets)['loss_cls'].item() == pytest.approx(expected.item(), rel=1e-5)


def test_smoothing_mixed_targets_gives_timms_smoothed_mixup_targets(fake_features):
    """timm mixes smoothed one-hots: lam * smooth(a) + (1 - lam) * smooth(b); the head smooths the mixture."""
    smoothing, lam, classes = 0.1, 0.35, 5
    head = ClassificationHead(num_classes=classes, embed_dim=32, label_smoothing=smoothing)
    logits = head(fake_features(batch=4))
    labels = np.array([0, 3, 4, 1])
    one_hot = np.eye(classes)[labels]
    smoothed = one_hot * (1 - smoothing) + smoothing / classes
    timm_targets = lam * smoothed + (1 - lam) * smoothed[::-1]
    mixed = torch.from_numpy(lam * one_hot + (1 - lam) * one_hot[::-1]).float()

    expected = _numpy_soft_cross_entropy(logits, timm_targets)
    assert head.loss(logits, mixed)['loss_cls'].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('targets', [torch.zeros(4, 3), torch.zeros(4, 5, dtype=torch.int64), torch.zeros(3)])
def test_targets_of_the_wrong_shape_are_refused(fake_features, targets):
    head = ClassificationHead(num_classes=5, embed_dim=32)
    with pytest.raises(ValueError, match='class indices of shape'):
        head.loss(head(fake_features(batch=4)), targets)
