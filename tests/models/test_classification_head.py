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
