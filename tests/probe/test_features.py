import numpy as np
import pytest
import torch

from mtvision.data import ImageFolderDataset, generate_synthetic
from mtvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtvision.models.backbones.vit import ViT
from mtvision.probe.features import FEATURE_NAMES, FeatureSet, cached_features, extract_features

PIPELINE = [dict(type='ToFloat'), dict(type='Normalize', mean=IMAGENET_MEAN, std=IMAGENET_STD)]


def tiny_backbone(depth: int = 4) -> ViT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ViT(model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=depth,
                   num_heads=2).eval()


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> ImageFolderDataset:
    root = tmp_path_factory.mktemp('synthetic')
    generate_synthetic(root, seed=0, num_train=7, num_val=3, image_size=32, num_classes=3)
    return ImageFolderDataset(root / 'classification' / 'train', PIPELINE)


def count_forwards(backbone: ViT, monkeypatch) -> list:
    calls = []
    original = backbone.model.forward_intermediates

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone.model, 'forward_intermediates', counting)
    return calls


def assert_equal_features(actual: FeatureSet, expected: FeatureSet) -> None:
    torch.testing.assert_close(actual.cls_tokens, expected.cls_tokens)
    torch.testing.assert_close(actual.avgpool, expected.avgpool)
    assert torch.equal(actual.labels, expected.labels)


@torch.no_grad()
def test_features_match_a_block_by_block_forward_in_dataset_order(dataset):
    backbone = tiny_backbone()
    features = extract_features(backbone, dataset, n_blocks=3, batch_size=3, progress=False)

    images = torch.stack([image for image, _ in dataset]).as_subclass(torch.Tensor)
    model = backbone.model
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    class_tokens = []
    for block in model.blocks:
        tokens = block(tokens)
        class_tokens.append(model.norm(tokens)[:, 0])
    assert features.cls_tokens.dtype == torch.float32 and features.cls_tokens.shape == (7, 3, 32)
    torch.testing.assert_close(features.cls_tokens, torch.stack(class_tokens[-3:], dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.avgpool, backbone(images).pooled, atol=1e-5, rtol=1e-5)
    assert features.labels.tolist() == [label for _, label in dataset.samples]


def test_select_builds_the_dinov2_grid():
    cls_tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    avgpool = -torch.arange(6, dtype=torch.float32).reshape(2, 3)
    features = FeatureSet(cls_tokens, avgpool, torch.tensor([0, 1]))
    last = cls_tokens[:, 3]
    concatenated = torch.tensor([[float(value) for block in range(4) for value in cls_tokens[row, block]]
                                 for row in range(2)])
    expected = {'cls': last, 'avgpool': avgpool, 'cls+avgpool': torch.cat([last, avgpool], dim=1),
                'last4': concatenated, 'last4+avgpool': torch.cat([concatenated, avgpool], dim=1)}
    assert set(expected) == set(FEATURE_NAMES)
    for name, value in expected.items():
        assert torch.equal(features.select(name), value), name


def test_select_errors_name_the_problem():
    features = FeatureSet(torch.zeros(2, 2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match='n_blocks >= 4'):
        features.select('last4')
    with pytest.raises(ValueError, match="unknown feature 'patch'"):
        features.select('patch')


def test_n_blocks_beyond_the_depth_is_an_error(dataset):
    with pytest.raises(ValueError, match=r'n_blocks must be in \[1, 2\] for a backbone of depth 2, got 4'):
        extract_features(tiny_backbone(depth=2), dataset, n_blocks=4, progress=False)


def test_cache_hit_loads_without_a_forward_pass(dataset, tmp_path, monkeypatch):
    backbone = tiny_backbone()
    calls = count_forwards(backbone, monkeypatch)
    key = dict(model='fingerprint-a', data='train', pipeline=PIPELINE)
    first = cached_features(backbone, dataset, tmp_path, key, batch_size=4, progress=False)
    assert sum(calls) == len(dataset)

    second = cached_features(backbone, dataset, tmp_path, key, batch_size=4, progress=False)
    assert sum(calls) == len(dataset)
    assert_equal_features(second, first)
    assert second.labels.dtype == torch.int64 and second.cls_tokens.dtype == torch.float32


@pytest.mark.parametrize('change', ['fingerprint', 'n_blocks'])
def test_another_model_or_feature_option_misses(dataset, tmp_path, monkeypatch, change):
    backbone = tiny_backbone()
    calls = count_forwards(backbone, monkeypatch)
    cached_features(backbone, dataset, tmp_path, dict(model='a'), n_blocks=4, progress=False)
    key, n_blocks = (dict(model='b'), 4) if change == 'fingerprint' else (dict(model='a'), 2)
    features = cached_features(backbone, dataset, tmp_path, key, n_blocks=n_blocks, progress=False)
    assert sum(calls) == 2 * len(dataset)
    assert features.cls_tokens.shape[1] == n_blocks


def test_a_write_interrupted_between_arrays_leaves_nothing_that_loads(dataset, tmp_path, monkeypatch):
    backbone = tiny_backbone()
    calls = count_forwards(backbone, monkeypatch)
    real_save, saved = np.save, []

    def crash_on_second_array(file, array, *args, **kwargs):
        saved.append(array)
        if len(saved) == 2:
            raise OSError('No space left on device')
        return real_save(file, array, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(np, 'save', crash_on_second_array)
        with pytest.raises(OSError, match='No space left'):
            cached_features(backbone, dataset, tmp_path, dict(model='a'), progress=False)
    assert sum(calls) == len(dataset)

    recovered = cached_features(backbone, dataset, tmp_path, dict(model='a'), progress=False)
    assert sum(calls) == 2 * len(dataset)
    reloaded = cached_features(backbone, dataset, tmp_path, dict(model='a'), progress=False)
    assert sum(calls) == 2 * len(dataset)
    reference = extract_features(tiny_backbone(), dataset, progress=False)
    assert_equal_features(recovered, reference)
    assert_equal_features(reloaded, reference)


def test_a_key_that_is_not_json_is_an_error(dataset, tmp_path):
    with pytest.raises(TypeError, match='feature cache key must be JSON-serialisable'):
        cached_features(tiny_backbone(), dataset, tmp_path, dict(model=object()), progress=False)
