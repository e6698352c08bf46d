import json
import math
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mtvision.data import ImageFolderDataset
from mtvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtvision.models.backbones.vit import ViT
from mtvision.probe.features import FEATURE_NAMES, FeatureSet, eval_pipeline, extract_features
from mtvision.probe.linear import (SWEEP_LRS, LinearHeadGrid, feature_statistics, linear_sweep, split_holdout,
                                   train_head_grid, train_linear_probe_mae)

COLOURS = {'red': (230, 30, 30), 'green': (30, 200, 40), 'blue': (20, 40, 220)}


def make_features(num_classes: int, per_class: int, dim: int = 8, seed: int = 0,
                  shuffle_labels: bool = False) -> FeatureSet:
    """Class tokens of 4 blocks and avgpool: Gaussian clusters around well separated class centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = 6 * torch.eye(num_classes, dim)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    cls_tokens = centres[labels][:, None].expand(-1, 4, -1) + torch.randn(len(labels), 4, dim, generator=generator)
    avgpool = centres[labels] + torch.randn(len(labels), dim, generator=generator)
    if shuffle_labels:
        labels = labels[torch.randperm(len(labels), generator=generator)]
    return FeatureSet(cls_tokens=cls_tokens, avgpool=avgpool, labels=labels)


def tiny_vit() -> ViT:
    torch.manual_seed(0)
    return ViT(model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope='module')
def colour_data(tmp_path_factory) -> Path:
    """train/ and val/ folders of three classes of noisy solid-colour images: a trivially separable dataset."""
    root = tmp_path_factory.mktemp('colours')
    rng = np.random.default_rng(0)
    for split, count in (('train', 8), ('val', 4)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = np.clip(np.array(rgb[::-1]) + rng.normal(0, 10, (16, 16, 3)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(root / split / name / f'{i}.png'), image)
    return root


def test_split_holdout_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 2 + [3])
    fit, held_out = split_holdout(labels, 0.1, seed=3)
    assert sorted(torch.cat([fit, held_out]).tolist()) == list(range(len(labels)))
    # 10% of 20 and of 10; a class of two still keeps one on each side; a single sample stays in fit
    assert torch.bincount(labels[held_out], minlength=4).tolist() == [2, 1, 1, 0]
    again, _ = split_holdout(labels, 0.1, seed=3)
    other, _ = split_holdout(labels, 0.1, seed=4)
    assert torch.equal(fit, again) and not torch.equal(fit, other)
    with pytest.raises(ValueError, match='fraction'):
        split_holdout(labels, 1.0)


def test_sweep_separates_separable_features_and_reports_the_best_head():
    train, val = make_features(4, 40, seed=0), make_features(4, 20, seed=1)
    results = linear_sweep(train, val, 4, epochs=5, batch_size=32, progress=False, device='cpu')
    # separable: many rates reach 100%, the lowest of them wins and the grid needs no extension
    assert results['lrs'] == list(SWEEP_LRS) and results['lr_at_edge'] is None
    assert [(entry['feature'], entry['lr']) for entry in results['grid']] == [
        (name, lr) for name in FEATURE_NAMES for lr in SWEEP_LRS]
    best = results['best']
    assert best['held_out']['top1'] == max(entry['held_out']['top1'] for entry in results['grid'])
    assert best['held_out']['top1'] == 100.0 and best['val']['top1'] == 100.0
    assert best['scaled_lr'] == pytest.approx(best['lr'] * 32 / 256)
    assert (results['selection'], results['optimizer'], results['iterations']) == ('held_out', 'sgd', 5 * 5)


def test_sweep_on_shuffled_labels_stays_near_chance():
    train = make_features(4, 60, seed=0, shuffle_labels=True)
    val = make_features(4, 100, seed=1, shuffle_labels=True)
    results = linear_sweep(train, val, 4, features=('cls', 'last4'), epochs=5, batch_size=32, progress=False,
                           device='cpu')
    # chosen on the held-out split, so its val accuracy is an unbiased estimate around 25% (std about 2.2)
    assert 15 < results['best']['val']['top1'] < 35


def test_every_head_of_the_grid_matches_a_head_trained_alone():
    train = make_features(3, 10, dim=4)
    lrs, epochs, in_dims = [0.05, 0.5, 2.0], 4, {'cls': 4, 'last4+avgpool': 20}
    grid = LinearHeadGrid(in_dims, len(lrs), 3, generator=torch.Generator().manual_seed(0))
    initial = {(name, i): (head.weight.detach().clone(), head.bias.detach().clone())
               for name in in_dims for i, head in enumerate(grid.heads[name])}
    # one batch of the whole set per epoch: the order of samples within it does not change the gradient
    iterations = train_head_grid(grid, train, lrs, epochs, batch_size=len(train), progress=False, device='cpu')
    assert iterations == epochs
    for (name, i), (weight, bias) in initial.items():
        alone = torch.nn.Linear(in_dims[name], 3)
        with torch.no_grad():
            alone.weight.copy_(weight)
            alone.bias.copy_(bias)
        optimizer = torch.optim.SGD(alone.parameters(), lr=lrs[i], momentum=0.9)
        for step in range(epochs):
            optimizer.param_groups[0]['lr'] = lrs[i] * 0.5 * (1 + math.cos(math.pi * step / epochs))
            optimizer.zero_grad()
            F.cross_entropy(alone(train.select(name)), train.labels).backward()
            optimizer.step()
        torch.testing.assert_close(grid.heads[name][i].weight, alone.weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grid.heads[name][i].bias, alone.bias, atol=1e-5, rtol=1e-5)
        assert not torch.equal(alone.weight, weight)


class CountingFeatureSet(FeatureSet):
    """Records the size of every selection, to count the batches the training loop draws."""

    drawn: list = []

    def select(self, name: str) -> torch.Tensor:
        self.drawn.append((name, len(self.labels)))
        return super().select(name)


def test_one_pass_over_the_data_feeds_every_head():
    base = make_features(2, 25)
    train = CountingFeatureSet(base.cls_tokens, base.avgpool, base.labels)
    grid = LinearHeadGrid({'cls': 8, 'avgpool': 8}, num_heads=13, num_classes=2)
    CountingFeatureSet.drawn = []
    train_head_grid(grid, train, [0.01] * 13, epochs=2, batch_size=16, progress=False, device='cpu')
    # 50 samples in batches of 16: 16, 16, 16, 2 per epoch; each batch read once per feature, not once per head
    per_epoch = [16, 16, 16, 2]
    assert [size for name, size in CountingFeatureSet.drawn if name == 'cls'] == per_epoch * 2
    assert [size for name, size in CountingFeatureSet.drawn if name == 'avgpool'] == per_epoch * 2


def test_an_iteration_schedule_runs_on_across_passes():
    base = make_features(2, 25)
    train = CountingFeatureSet(base.cls_tokens, base.avgpool, base.labels)
    grid = LinearHeadGrid({'cls': 8}, num_heads=2, num_classes=2)
    CountingFeatureSet.drawn = []
    assert train_head_grid(grid, train, [0.01] * 2, batch_size=16, iterations=6, progress=False, device='cpu') == 6
    # a pass is 16, 16, 16, 2; the second is cut after two batches
    assert [size for _, size in CountingFeatureSet.drawn] == [16, 16, 16, 2, 16, 16]
    with pytest.raises(ValueError, match='exactly one of epochs'):
        train_head_grid(grid, train, [0.01] * 2, epochs=1, iterations=6, progress=False)


def test_feature_statistics_match_numpy_and_leave_constant_columns_alone():
    features = make_features(3, 7, dim=5, seed=2)
    features.avgpool[:, 1] = 1e4  # constant: scaled by 1, so it stays zero after centring
    mean, std = feature_statistics(features, chunk_size=4)
    for name in ('cls', 'last4+avgpool'):
        columns = features.select(name).double().numpy()
        expected_std = columns.std(0)
        expected_std[expected_std == 0] = 1
        np.testing.assert_allclose(mean.select(name)[0].numpy(), columns.mean(0), rtol=1e-6)
        np.testing.assert_allclose(std.select(name)[0].numpy(), expected_std, rtol=1e-5)
    # a grid standardising its inputs equals a plain grid fed the standardised features
    in_dims = {'last4+avgpool': 25}
    statistics = {'last4+avgpool': (mean.select('last4+avgpool')[0], std.select('last4+avgpool')[0])}
    plain = LinearHeadGrid(in_dims, 2, 3, generator=torch.Generator().manual_seed(0))
    standardising = LinearHeadGrid(in_dims, 2, 3, generator=torch.Generator().manual_seed(0), standardise=statistics)
    inputs = features.select('last4+avgpool')
    torch.testing.assert_close(standardising({'last4+avgpool': inputs})['last4+avgpool'],
                               plain({'last4+avgpool': (inputs - statistics['last4+avgpool'][0])
                                      / statistics['last4+avgpool'][1]})['last4+avgpool'])


def test_sweep_counts_iterations_by_default_and_epochs_when_asked():
    train = make_features(3, 20)
    counted = linear_sweep(train, None, 3, features=('cls',), lrs=(0.1,), progress=False, device='cpu')
    assert (counted['iterations'], counted['epochs']) == (1000, round(1000 * 128 / 54, 2))
    by_epochs = linear_sweep(train, None, 3, features=('cls',), lrs=(0.1,), epochs=3, batch_size=16,
                             progress=False, device='cpu')
    # 54 samples fit after holding out 6: 4 batches a pass
    assert (by_epochs['iterations'], by_epochs['epochs']) == (12, 3)
    with pytest.raises(ValueError, match='not both'):
        linear_sweep(train, None, 3, epochs=3, iterations=10, progress=False)


def test_sweep_errors_name_the_problem():
    train = make_features(2, 5)
    with pytest.raises(ValueError, match="'last5'"):
        linear_sweep(train, None, 2, features=('cls', 'last5'), progress=False)
    with pytest.raises(ValueError, match='val_fraction=0 needs a val'):
        linear_sweep(train, None, 2, val_fraction=0, progress=False)
    with pytest.raises(ValueError, match='train label 1 at index 5'):
        linear_sweep(train, None, 1, progress=False)


@pytest.fixture
def recorded_steps():
    """(optimizer class name, learning rate) of every optimizer step taken while the test runs."""
    steps = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: steps.append((type(optimizer).__name__, optimizer.param_groups[0]['lr'])))
    yield steps
    handle.remove()


def _colour_sets(root: Path) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    pipeline = eval_pipeline(32, IMAGENET_MEAN, IMAGENET_STD)
    train = ImageFolderDataset(root / 'train', [dict(type='RandomResizedCrop', size=32),
                                                dict(type='RandomHorizontalFlip'), *pipeline[-2:]])
    return train, ImageFolderDataset(root / 'val', pipeline)


def test_mae_protocol_follows_the_mae_schedule_with_lars(colour_data, recorded_steps):
    train, val = _colour_sets(colour_data)
    results = train_linear_probe_mae(tiny_vit(), train, val, 3, epochs=4, batch_size=8, blr=0.4, warmup_epochs=1,
                                     progress=False, device='cpu')
    assert results['lr'] == 0.4 * 8 / 256 and results['iterations'] == 4 * 3
    # MAE's adjust_learning_rate at fractional epoch e = step / iterations_per_epoch: warm-up, then half-cosine
    lr = results['lr']
    expected = [lr * e if e < 1 else lr * 0.5 * (1 + math.cos(math.pi * (e - 1) / 3))
                for e in (step / 3 for step in range(12))]
    assert [name for name, _ in recorded_steps] == ['LARS'] * 12
    assert [value for _, value in recorded_steps] == pytest.approx(expected)


def test_mae_protocol_learns_a_trivially_separable_dataset(colour_data):
    train, val = _colour_sets(colour_data)
    # few steps: SGD, since LARS moves each weight by about lr / 1000 of its norm per step (MAE's lr 6.4 comes
    # with a batch of 16384 and 90 epochs)
    results = train_linear_probe_mae(tiny_vit(), train, val, 3, epochs=4, batch_size=8, blr=10.0, warmup_epochs=1,
                                     optimizer='sgd', progress=False, device='cpu')
    assert results['top1'] > 80 and results['top5'] == 100.0


def test_mae_protocol_rejects_what_it_cannot_run(colour_data):
    val = ImageFolderDataset(colour_data / 'val', eval_pipeline(32, IMAGENET_MEAN, IMAGENET_STD))
    with pytest.raises(ValueError, match="feature='last4'"):
        train_linear_probe_mae(tiny_vit(), val, val, 3, feature='last4')
    with pytest.raises(ValueError, match='12 images, fewer than one batch of 256'):
        train_linear_probe_mae(tiny_vit(), val, val, 3, progress=False, device='cpu')


@pytest.fixture
def fake_load_backbone(monkeypatch):
    import mtvision.probe.models as models
    calls = []

    def load_backbone(spec, config=None, task=None):
        calls.append((spec, config, task))
        return types.SimpleNamespace(backbone=tiny_vit(), fingerprint='tiny', mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                     img_size=32)

    monkeypatch.setattr(models, 'load_backbone', load_backbone)
    return calls


def test_tool_sweep_equals_the_sweep_on_extracted_features(colour_data, tmp_path, fake_load_backbone, capsys,
                                                           load_tool):
    out = tmp_path / 'out' / 'linear.json'
    argv = ['timm:tiny', '--data', str(colour_data), '--epochs', '3', '--batch-size', '8', '--lrs', '0.01', '0.1',
            '--num-workers', '0', '--cache-dir', str(tmp_path / 'cache'), '--out', str(out), '--no-progress']
    results = load_tool('linear_probe').main(argv)
    assert fake_load_backbone == [('timm:tiny', None, None)]
    pipeline = eval_pipeline(32, IMAGENET_MEAN, IMAGENET_STD)
    train, val = (extract_features(tiny_vit(), ImageFolderDataset(colour_data / split, pipeline), n_blocks=2,
                                   progress=False) for split in ('train', 'val'))
    # the 2-block backbone has no 'last4' features: the tool probes the others
    # the tool's default chooses the best head on the val split (DINOv2's protocol)
    expected = linear_sweep(train, val, 3, lrs=(0.01, 0.1), features=('cls', 'avgpool', 'cls+avgpool'), epochs=3,
                            batch_size=8, val_fraction=0.0, progress=False, device='cpu')
    # the same heads on the same features: accuracies are counts of the same predictions
    assert results['grid'] == expected['grid'] and results['best'] == expected['best']
    assert json.loads(out.read_text()) == results
    printed = capsys.readouterr().out
    best = expected['best']
    # 24 images in batches of 8: 3 epochs are 9 iterations
    assert printed.splitlines()[2].split()[:8] == ['val', best['feature'], '3', '9', '8', 'sgd', f"{best['lr']:.4g}",
                                                   f"{best['scaled_lr']:.4g}"]
    # a second run reads the cache: the same numbers
    assert load_tool('linear_probe').main(argv)['grid'] == results['grid']


def test_tool_sweep_takes_iterations_and_refuses_them_with_epochs(colour_data, tmp_path, fake_load_backbone,
                                                                   load_tool):
    argv = ['timm:tiny', '--data', str(colour_data), '--batch-size', '8', '--lrs', '0.01', '0.1', '--feature', 'cls',
            '--num-workers', '0', '--cache-dir', str(tmp_path / 'cache'), '--no-progress']
    results = load_tool('linear_probe').main(argv + ['--iterations', '5', '--no-standardise'])
    assert (results['iterations'], results['epochs'], results['standardised']) == (5, round(5 * 8 / 24, 2), False)
    with pytest.raises(SystemExit):
        load_tool('linear_probe').parse_args(argv + ['--iterations', '5', '--epochs', '2'])


def test_tool_mae_protocol_prints_its_settings(colour_data, tmp_path, fake_load_backbone, capsys, load_tool):
    results = load_tool('linear_probe').main([
        'timm:tiny', '--data', str(colour_data / 'train'), '--val', str(colour_data / 'val'), '--protocol', 'mae',
        '--epochs', '2', '--warmup-epochs', '1', '--batch-size', '8', '--optimizer', 'sgd', '--num-workers', '0',
        '--no-progress'])
    assert (results['protocol'], results['optimizer'], results['epochs'], results['lr']) == (
        'mae', 'sgd', 2, 0.1 * 8 / 256)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ['split', 'feature', 'epochs', 'iters', 'batch', 'optimizer', 'base_lr', 'lr',
                                  'top-1', 'top-5']
    # 24 training images in batches of 8: 2 epochs are 6 iterations
    assert printed[2].split()[:8] == ['val', 'cls', '2', '6', '8', 'sgd', '0.1', f'{0.1 * 8 / 256:.4g}']


def test_tool_mae_protocol_scales_its_warm_up_to_few_epochs(colour_data, fake_load_backbone, load_tool):
    """MAE's 10 warm-up epochs of 90, scaled: 18 epochs warm up for 2, 4 epochs for none (10 would be refused)."""
    argv = ['timm:tiny', '--data', str(colour_data / 'train'), '--val', str(colour_data / 'val'), '--protocol', 'mae',
            '--batch-size', '8', '--optimizer', 'sgd', '--num-workers', '0', '--no-progress']
    assert load_tool('linear_probe').main(argv + ['--epochs', '4'])['warmup_epochs'] == 0
    assert load_tool('linear_probe').main(argv + ['--epochs', '18'])['warmup_epochs'] == 2
