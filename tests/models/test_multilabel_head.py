import math

import pytest
import torch

from mtvision.models.heads.multilabel import MultiLabelClassificationHead, asymmetric_loss


def make_head(**kwargs) -> MultiLabelClassificationHead:
    torch.manual_seed(0)
    return MultiLabelClassificationHead(num_classes=4, embed_dim=32, **kwargs)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def reference_asl(logit, target, gamma_neg=4.0, gamma_pos=0.0, clip=0.05):
    """Ridnik et al.'s Eq. 7 for one label, in plain Python."""
    p = sigmoid(logit)
    if target == 1:
        return -((1 - p) ** gamma_pos) * math.log(p)
    shifted = max(p - clip, 0.0)
    return -(shifted ** gamma_neg) * math.log(1 - shifted)


def reference_bce(logit, target):
    p = sigmoid(logit)
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


TARGETS = torch.tensor([[1.0, 0.0, -1.0, 1.0], [0.0, -1.0, -1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])


@pytest.mark.parametrize('kind', ['bce', 'asymmetric'])
def test_loss_is_the_mean_over_known_labels_of_the_per_label_loss(kind):
    head = make_head(loss=kind)
    logits = torch.tensor([[2.0, -1.0, 9.0, 0.5], [0.1, 3.0, -4.0, -2.0], [-3.0, 0.04, 1.5, 0.2]])
    per_label = reference_bce if kind == 'bce' else reference_asl
    known = [(i, k) for i in range(3) for k in range(4) if TARGETS[i, k] != -1]
    expected = sum(per_label(float(logits[i, k]), float(TARGETS[i, k])) for i, k in known) / len(known)
    assert head.loss(logits, TARGETS)['loss_multilabel'].item() == pytest.approx(expected, rel=1e-5)
    normalizer = head.loss_normalizer(TARGETS, (32, 32))
    assert normalizer.item() == len(known) == 9
    torch.testing.assert_close(head.loss(logits, TARGETS, normalizer=normalizer * 2)['loss_multilabel'],
                               head.loss(logits, TARGETS)['loss_multilabel'] / 2)


def test_asymmetric_loss_discards_easy_negatives_and_reduces_to_bce_without_focusing():
    logits = torch.tensor([[-4.0, 0.0, 3.0]])  # p = 0.018 < clip: no loss as a negative
    losses = asymmetric_loss(logits, torch.zeros(1, 3))
    assert losses[0, 0].item() == 0
    assert losses[0, 2].item() == pytest.approx(reference_asl(3.0, 0), rel=1e-5)
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    torch.testing.assert_close(asymmetric_loss(logits, targets, gamma_neg=0, gamma_pos=0, clip=0),
                               torch.nn.functional.binary_cross_entropy_with_logits(logits, targets,
                                                                                    reduction='none'))


@pytest.mark.parametrize('kind', ['bce', 'asymmetric'])
def test_unknown_labels_get_no_gradient(kind):
    head = make_head(loss=kind)
    logits = torch.randn(3, 4, requires_grad=True)
    head.loss(logits, TARGETS)['loss_multilabel'].backward()
    unknown = TARGETS == -1
    assert not logits.grad[unknown].any() and logits.grad[~unknown].abs().min() > 0
    everything_unknown = torch.full((3, 4), -1.0)
    loss = head.loss(logits, everything_unknown)['loss_multilabel']
    assert loss.item() == 0 and loss.requires_grad


def test_predict_gives_independent_probabilities(fake_features):
    head = make_head(feature='avg')
    outputs = head(fake_features(channels=32))
    assert outputs.shape == (2, 4)
    torch.testing.assert_close(head.predict(outputs), outputs.detach().sigmoid())


def test_bad_input():
    with pytest.raises(ValueError, match="loss must be one of .* got 'focal'"):
        make_head(loss='focal')
    with pytest.raises(ValueError, match='0 <= clip < 1'):
        make_head(loss='asymmetric', clip=1.0)
    head = make_head()
    with pytest.raises(ValueError, match=r'must have shape \[B, 4\], got \[3\]'):
        head.loss(torch.zeros(3, 4), torch.zeros(3))
    bad = TARGETS.clone()
    bad[2, 1] = 2.0
    with pytest.raises(ValueError, match=r'target 2.0 at batch index 2, class 1 is neither'):
        head.loss_normalizer(bad, (32, 32))


@pytest.mark.parametrize('kind', ['bce', 'asymmetric'])
def test_loss_falls_when_overfitting_one_batch(kind, tiny_vit):
    torch.manual_seed(0)
    head = MultiLabelClassificationHead(num_classes=4, embed_dim=tiny_vit.embed_dim, loss=kind)
    with torch.no_grad():  # the head alone learns
        features = tiny_vit(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-2)
    losses = []
    for _ in range(50):
        loss = head.loss(head(features), TARGETS)['loss_multilabel']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
