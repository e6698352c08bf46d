import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mtvision.data import generate_synthetic
from mtvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtvision.models.backbones.vit import ViT
from mtvision.probe.features import knn_classify


def test_weighted_votes_match_hand_computed_scores_with_ties_and_k_beyond_n():
    # cosine similarities to query (1, 0): a 1, b and c 1/sqrt(2) (tied, other classes), d and e 0 (tied, same
    # class), f -1; to query (0, -3): e 1, c 1/sqrt(2), a and f 0 (tied), b -1/sqrt(2), d -1.
    # No k below splits a tie between classes, so the scores do not depend on how ties are broken.
    train = torch.tensor([[2., 0.], [1., 1.], [1., -1.], [0., 5.], [0., -1.], [-1., 0.]])
    labels = torch.tensor([0, 1, 2, 0, 0, 1])
    test = torch.tensor([[1., 0.], [0., -3.]])
    w = lambda similarity: math.exp(similarity / 0.5)  # noqa: E731
    s = 1 / math.sqrt(2)
    expected = {
        1: [[w(1), 0, 0],
            [w(1), 0, 0]],
        4: [[w(1) + w(0), w(s), w(s)],
            [w(1) + w(0), w(0), w(s)]],
        5: [[w(1) + 2 * w(0), w(s), w(s)],
            [w(1) + w(0), w(0) + w(-s), w(s)]],
        100: [[w(1) + 2 * w(0), w(s) + w(-1), w(s)],
              [w(1) + w(0) + w(-1), w(0) + w(-s), w(s)]],
    }
    scores = knn_classify(train, labels, test, num_classes=3, ks=(1, 4, 5, 100), temperature=0.5)
    assert sorted(scores) == [1, 4, 5, 100]
    for k, value in expected.items():
        torch.testing.assert_close(scores[k], torch.tensor(value), rtol=1e-5, atol=1e-6, msg=f'k={k}')


def test_chunked_scores_match_a_dense_reference():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(20, 5, generator=generator)
    labels = torch.randint(0, 4, (20,), generator=generator)
    test = torch.randn(10, 5, generator=generator)
    ks = (1, 3, 7, 50)
    scores = knn_classify(train, labels, test, num_classes=4, ks=ks, temperature=0.1, chunk=3)

    train64 = train.double().numpy() / np.linalg.norm(train.double().numpy(), axis=1, keepdims=True)
    test64 = test.double().numpy() / np.linalg.norm(test.double().numpy(), axis=1, keepdims=True)
    similarities = test64 @ train64.T
    order = np.argsort(-similarities, axis=1, kind='stable')
    for k in ks:
        expected = np.zeros((10, 4))
        for row in range(10):
            for neighbour in order[row, :k]:
                expected[row, labels[neighbour]] += np.exp(similarities[row, neighbour] / 0.1)
        np.testing.assert_allclose(scores[k].numpy(), expected, rtol=1e-4, err_msg=f'k={k}')


def test_separable_clusters_are_classified_perfectly():
    generator = torch.Generator().manual_seed(1)
    centres = torch.eye(8)[:4] * 3
    train_labels = torch.arange(40) % 4
    test_labels = torch.arange(20) % 4
    train = centres[train_labels] + 0.3 * torch.randn(40, 8, generator=generator)
    test = centres[test_labels] + 0.3 * torch.randn(20, 8, generator=generator)
    for k, scores in knn_classify(train, train_labels, test, num_classes=4, ks=(1, 10, 20)).items():
        assert torch.equal(scores.argmax(dim=1), test_labels), k


@pytest.mark.parametrize('kwargs, message', [
    (dict(train_labels=torch.tensor([0, 3])), 'train label 3 at index 1 is outside'),
    (dict(temperature=0.0), 'temperature must be positive'),
    (dict(test=torch.zeros(1, 3)), 'the same D'),
    (dict(ks=(0, 5)), 'ks must be positive'),
])
def test_bad_arguments_are_errors(kwargs, message):
    arguments = dict(train=torch.eye(2), train_labels=torch.tensor([0, 1]), test=torch.eye(2), num_classes=3)
    with pytest.raises(ValueError, match=message):
        knn_classify(**{**arguments, **kwargs})


# tools/knn.py


@pytest.fixture(scope='module')
def class_folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('synthetic')
    generate_synthetic(root, seed=0, num_train=6, num_val=3, image_size=32, num_classes=3)
    return root / 'classification'


@pytest.fixture
def knn_tool(monkeypatch, load_tool):
    """tools/knn.py with load_backbone replaced by a tiny random ViT; ``calls`` counts its forward passes."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = ViT(model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=4,
                       num_heads=2).eval()
    calls, requests = [], []
    original = backbone.model.forward_intermediates
    monkeypatch.setattr(backbone.model, 'forward_intermediates',
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))

    def load_backbone(spec, config=None, task=None):
        requests.append(dict(spec=spec, config=config, task=task))
        return types.SimpleNamespace(backbone=backbone, fingerprint='tiny-random', mean=IMAGENET_MEAN,
                                     std=IMAGENET_STD, img_size=32)

    monkeypatch.setitem(sys.modules, 'mtvision.probe.models', types.SimpleNamespace(load_backbone=load_backbone))
    return load_tool('knn'), calls, requests


def test_tool_finds_each_image_itself_and_reuses_cached_features(knn_tool, class_folders, tmp_path, capsys):
    tool, calls, requests = knn_tool
    train = str(class_folders / 'train')
    common = ['timm:tiny', '--data', train, '--val', train, '--task', 'classification', '--num-workers', '0',
              '--batch-size', '4', '--cache-dir', str(tmp_path / 'cache')]
    out = tmp_path / 'knn.json'
    results = tool.main([*common, '--ks', '1', '3', '--out', str(out)])
    assert requests == [dict(spec='timm:tiny', config=None, task='classification')]
    # validating on the training images: each image's nearest neighbour is itself
    assert results['results'][0] == dict(k=1, top1=100.0, top5=100.0)
    assert [row['k'] for row in results['results']] == [1, 3]
    assert (results['num_train'], results['num_val'], results['num_classes']) == (6, 6, 3)
    assert json.loads(out.read_text()) == results
    assert 'kNN on cls, T=0.07' in capsys.readouterr().out
    forwards = len(calls)
    assert forwards > 0

    again = tool.main([*common, '--ks', '1', '--feature', 'last4+avgpool'])
    assert len(calls) == forwards
    assert again['feature'] == 'last4+avgpool' and again['results'][0]['top1'] == 100.0


def test_tool_needs_train_and_val_folders(knn_tool, tmp_path):
    tool, _, _ = knn_tool
    with pytest.raises(FileNotFoundError, match='train/ and val/ sub-folders, or pass --val'):
        tool.main(['timm:tiny', '--data', str(tmp_path), '--num-workers', '0'])
