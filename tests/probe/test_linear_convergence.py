"""The sweep's defaults against a converged reference: scikit-learn's multinomial logistic regression on the same
features, its regularisation tuned on the same held-out split, on real handwritten digits (sklearn's 8x8 digits,
shipped with the package)."""
import logging

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mtvision.probe.features import FeatureSet
from mtvision.probe.linear import SWEEP_LRS, linear_sweep, split_holdout

VAL_FRACTION = 0.2
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices of 64 columns gain nothing from threads, and on a busy machine their synchronisation stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def digits() -> dict:
    """Train / test FeatureSets of the 1797 digits: 'cls' is the 64 raw pixels (0..16), 'avgpool' a fixed random
    projection of them squashed, scaled by 30 and offset by 100 (far from standardised)."""
    pixels, labels = load_digits(return_X_y=True)
    pixels, labels = torch.tensor(pixels, dtype=torch.float32), torch.tensor(labels)
    generator = torch.Generator().manual_seed(0)
    projected = torch.tanh(pixels @ torch.randn(64, 48, generator=generator) / 20) * 30 + 100
    order = torch.randperm(len(labels), generator=generator)
    splits = {'train': order[:1200], 'test': order[1200:]}
    return {split: FeatureSet(cls_tokens=pixels[index, None], avgpool=projected[index], labels=labels[index])
            for split, index in splits.items()}


def sklearn_reference(train: FeatureSet, test: FeatureSet, feature: str, seed: int = 0) -> float:
    """Test top-1 (percent) of logistic regression fit on the sweep's fit split, C chosen on its held-out split."""
    fit, held_out = split_holdout(train.labels, VAL_FRACTION, seed)
    features, labels = train.select(feature).numpy(), train.labels.numpy()
    scaler = StandardScaler().fit(features[fit])
    best_held_out, best_test = -1.0, None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(features[fit]), labels[fit])
        held_out_accuracy = model.score(scaler.transform(features[held_out]), labels[held_out])
        if held_out_accuracy > best_held_out:
            best_held_out = held_out_accuracy
            best_test = model.score(scaler.transform(test.select(feature).numpy()), test.labels.numpy())
    return 100 * best_test


def best_of_feature(results: dict, feature: str) -> dict:
    heads = [entry for entry in results['grid'] if entry['feature'] == feature]
    return max(heads, key=lambda entry: entry['held_out']['top1'])


def test_default_sweep_matches_converged_logistic_regression_on_digits(digits, caplog):
    with caplog.at_level(logging.WARNING, logger='mtvision.probe.linear'):
        results = linear_sweep(digits['train'], digits['test'], 10, features=('cls', 'avgpool'),
                               val_fraction=VAL_FRACTION, progress=False, device='cpu')
    assert results['iterations'] == 1000 and results['standardised']
    assert not caplog.records
    for feature in ('cls', 'avgpool'):
        best = best_of_feature(results, feature)
        reference = sklearn_reference(digits['train'], digits['test'], feature)
        # 597 test digits: one is 0.17 points; both near 97% (pixels) and 93% (projection)
        assert abs(best['val']['top1'] - reference) < 1.5, (feature, best, reference)
        # the optimum is bracketed by the default grid, not extended
        assert SWEEP_LRS[0] < best['lr'] < SWEEP_LRS[-1]
    assert results['lrs'] == list(SWEEP_LRS) and results['lr_at_edge'] is None


def test_ten_epochs_without_standardising_fall_short_on_digits(digits):
    """The former defaults (10 epochs, raw features, DINOv2's rates) on the badly scaled projection: the problem
    the new defaults fix, measured against the same reference."""
    dinov2_lrs = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
    results = linear_sweep(digits['train'], digits['test'], 10, lrs=dinov2_lrs, features=('avgpool',), epochs=10,
                           val_fraction=VAL_FRACTION, standardise=False, progress=False, device='cpu')
    reference = sklearn_reference(digits['train'], digits['test'], 'avgpool')
    assert results['iterations'] == 10 * 8
    assert results['best']['val']['top1'] < reference - 5


def test_a_grid_below_the_optimum_extends_upwards_then_warns(digits, caplog):
    narrow = (1e-5, 2e-5, 5e-5)
    with caplog.at_level(logging.WARNING, logger='mtvision.probe.linear'):
        results = linear_sweep(digits['train'], None, 10, lrs=narrow, features=('cls',), iterations=100,
                               val_fraction=VAL_FRACTION, grid_extensions=2, progress=False, device='cpu')
    # two decades added above 5e-5, each the top decade moved up by ten
    assert results['lrs'] == pytest.approx([1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3], rel=1e-9)
    assert [entry['lr'] for entry in results['grid']] == results['lrs']
    assert results['best']['lr'] == pytest.approx(5e-3) and results['lr_at_edge'] == 'top'
    [record] = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert 'base lr 0.005' in message and 'top of the lr grid' in message and '1e-05' in message
    # the added heads trained on the same batches of the same standardised features as a sweep of them alone
    alone = linear_sweep(digits['train'], None, 10, lrs=(1e-4, 2e-4, 5e-4), features=('cls',), iterations=100,
                         val_fraction=VAL_FRACTION, progress=False, device='cpu')
    assert results['grid'][3:6] == alone['grid']


def test_a_given_grid_is_trained_as_given_and_warned_about(digits, caplog):
    with caplog.at_level(logging.WARNING, logger='mtvision.probe.linear'):
        results = linear_sweep(digits['train'], None, 10, lrs=(0.5, 50.0), features=('cls',), iterations=100,
                               val_fraction=VAL_FRACTION, progress=False, device='cpu')
    assert results['lrs'] == [0.5, 50.0] and results['lr_at_edge'] == 'bottom'
    [record] = caplog.records
    assert 'base lr 0.5,' in record.getMessage() and 'bottom of the lr grid [0.5, 50.0]' in record.getMessage()


def test_standardising_makes_the_sweep_blind_to_feature_scale(digits):
    """Per-column affine maps of the features (positive scales) leave the standardised sweep's heads the same."""
    train = digits['train']
    generator = torch.Generator().manual_seed(1)
    scale = torch.exp(torch.randn(64, generator=generator) * 2)
    shift = torch.randn(64, generator=generator) * 50
    rescaled = FeatureSet(cls_tokens=train.cls_tokens * scale + shift, avgpool=train.avgpool, labels=train.labels)
    kwargs = dict(lrs=(0.01, 0.1, 1.0), features=('cls',), iterations=200, val_fraction=VAL_FRACTION, progress=False,
                  device='cpu')
    original, transformed = (linear_sweep(data, None, 10, **kwargs) for data in (train, rescaled))
    # the standardised inputs agree to float rounding, so the predictions (counted in the accuracies) do too
    held_out = np.array([entry['held_out']['top1'] for entry in original['grid']])
    assert np.abs(held_out - [entry['held_out']['top1'] for entry in transformed['grid']]).max() <= 100 / 240 + 1e-9
