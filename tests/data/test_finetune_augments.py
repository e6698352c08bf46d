"""Fine-tuning augmentations: RandAugment, TrivialAugmentWide, 3-Augment in pipelines; random erasing, MixUp and
CutMix on normalised batches, with soft targets."""
import math

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from mtvision.data import batch_augments as batch_augments_module
from mtvision.data.batch_augments import (CutMix, MixUp, RandomErasing, augment_batches, batch_augment_for,
                                          build_batch_augments)
from mtvision.data.prefetch import Normalization, to_device
from mtvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_pipeline
from mtvision.tasks import build_tasks

NUM_CLASSES = 5


def distinct_batch(batch: int = 4, size: int = 8) -> dict:
    """Normalised-looking images in which image i's pixels all equal i, so every pixel says which image it is from."""
    images = torch.arange(batch, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, size, size).clone()
    return dict(images=images, targets=torch.tensor([0, 2, 4, 1])[:batch], indices=list(range(batch)))


def build(cfgs, num_classes=NUM_CLASSES):
    return build_batch_augments(cfgs, num_classes)


# --- per-image transforms --------------------------------------------------------------------------------------

@pytest.mark.parametrize('cfg', [dict(type='RandAugment', num_ops=2, magnitude=9), dict(type='TrivialAugmentWide'),
                                 dict(type='ThreeAugment'), dict(type='ThreeAugment', color_jitter=0),
                                 dict(type='RandomApply', transforms=[dict(type='ThreeAugment')], p=0.5)])
@pytest.mark.parametrize('target', [3, torch.tensor([1.0, 0.0, -1.0])])
def test_transform_builds_from_a_config_and_keeps_the_target(cfg, target):
    pipeline = build_pipeline([cfg, dict(type='ToFloat'), dict(type='Normalize', mean=IMAGENET_MEAN,
                                                                 std=IMAGENET_STD)])
    image = tv_tensors.Image(torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8))
    for seed in range(5):
        torch.manual_seed(seed)
        out_image, out_target = pipeline(image, target)
        assert out_image.shape == (3, 24, 24) and out_image.dtype == torch.float32
        assert out_target is target if isinstance(target, int) else torch.equal(out_target, target)


@pytest.mark.parametrize('name', ['RandAugment', 'TrivialAugmentWide'])
def test_auto_augment_refuses_dense_targets_it_would_misalign(name):
    image = tv_tensors.Image(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match=f'{name} moves the image only.*Mask'):
        build_pipeline([dict(type=name)])(image, tv_tensors.Mask(torch.zeros(16, 16, dtype=torch.int64)))


def test_three_augment_applies_exactly_one_of_grayscale_solarize_and_blur():
    generator = torch.Generator().manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator))
    pipeline = build_pipeline([dict(type='ThreeAugment', color_jitter=0, blur_sigma=(1.0, 2.0))])  # visible blurs
    solarized = F.solarize(image, threshold=128)
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out, label = pipeline(image, 7)
        assert label == 7 and out.dtype == torch.uint8
        if torch.equal(out, solarized):
            seen.add('solarize')
        elif torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]):
            seen.add('grayscale')
        else:  # a blur: a smoother image with about the same mean
            assert out.float().diff(dim=-1).abs().mean() < image.float().diff(dim=-1).abs().mean()
            assert abs(out.float().mean() - image.float().mean()) < 2
            seen.add('blur')
    assert seen == {'solarize', 'grayscale', 'blur'}


def test_a_batch_augment_in_a_pipeline_says_where_it_belongs():
    with pytest.raises(KeyError, match='batch_augments'):
        build_pipeline([dict(type='CutMix')])


# --- random erasing ---------------------------------------------------------------------------------------------

def erased_box(before: torch.Tensor, after: torch.Tensor) -> tuple[slice, slice] | None:
    """The bounding rows and columns of the pixels that changed, None when none did."""
    changed = (before != after).any(0)
    if not changed.any():
        return None
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    return slice(rows.min().item(), rows.max().item() + 1), slice(cols.min().item(), cols.max().item() + 1)


@pytest.mark.parametrize('mode', ['const', 'rand', 'pixel'])
def test_random_erasing_fills_one_rectangle_of_the_drawn_size(mode):
    torch.manual_seed(0)
    scale, ratio, size = (0.05, 0.3), (0.5, 2.0), 32
    images = torch.rand(16, 3, size, size) * 0.1 + 10  # far from the N(0, 1) fill, so every filled pixel changes
    targets, original = torch.arange(16), images.clone()
    erased, out_targets = RandomErasing(prob=1.0, scale=scale, ratio=ratio, mode=mode)(images, targets)
    assert out_targets is targets
    for before, after in zip(images, erased):
        rows, cols = erased_box(before, after)
        region = after[:, rows, cols]
        height, width = region.shape[-2:]
        assert (before != after).any(0).sum() == height * width, 'the changed pixels fill their bounding box'
        # rounding the sides to whole pixels moves the area and the aspect a little
        assert scale[0] * size * size * 0.7 <= height * width <= scale[1] * size * size * 1.3
        assert ratio[0] * 0.7 <= height / width <= ratio[1] * 1.3
        if mode == 'const':
            assert (region == 0).all(), 'the mean colour of the normalised space'
        elif mode == 'rand':
            assert torch.equal(region, region[:, :1, :1].expand_as(region)) and region.abs().max() < 6
        else:
            assert region.abs().max() < 6 and region.std() > 0.5
    assert torch.equal(images, original), 'the input batch is left as it was'


def test_random_erasing_prob_is_the_share_of_erased_images():
    torch.manual_seed(0)
    images = torch.zeros(400, 3, 16, 16) + 10
    erased, _ = RandomErasing(prob=0.25, mode='const')(images, None)
    share = (erased != images).flatten(1).any(1).float().mean().item()
    assert share == pytest.approx(0.25, abs=0.07)
    assert torch.equal(RandomErasing(prob=0.0)(images, None)[0], images)


# --- MixUp and CutMix -------------------------------------------------------------------------------------------

def test_mixup_mixes_images_and_targets_with_one_weight(monkeypatch):
    monkeypatch.setattr(batch_augments_module, '_beta', lambda alpha: 0.3)
    batch = distinct_batch()
    out = build([dict(type='MixUp', alpha=0.8)])(batch)
    assert out['indices'] is batch['indices'], 'other keys pass through'
    expected_images = 0.3 * batch['images'] + 0.7 * batch['images'].flip(0)
    torch.testing.assert_close(out['images'], expected_images)
    one_hot = torch.eye(NUM_CLASSES)[batch['targets']]
    torch.testing.assert_close(out['targets'], 0.3 * one_hot + 0.7 * one_hot.flip(0))
    torch.testing.assert_close(out['targets'].sum(1), torch.ones(4))


def test_cutmix_pastes_the_clipped_box_and_weighs_targets_by_its_area(monkeypatch):
    # lam 0.75: each side of the box is sqrt(0.25) = half the image's, 4 of 8 pixels; centred at row 2, column 7
    # it spans rows 0..4 and columns 5..9, clipped to 5..8: 12 of 64 pixels come from the mirrored image
    monkeypatch.setattr(batch_augments_module, '_beta', lambda alpha: 0.75)
    centre = iter([2, 7])
    monkeypatch.setattr(batch_augments_module, '_randint', lambda high: next(centre))
    batch = distinct_batch(size=8)
    out = build([dict(type='CutMix', alpha=1.0)])(batch)
    expected = batch['images'].clone()
    expected[..., 0:4, 5:8] = batch['images'].flip(0)[..., 0:4, 5:8]
    assert torch.equal(out['images'], expected)
    own = 1 - 12 / 64
    one_hot = torch.eye(NUM_CLASSES)[batch['targets']]
    torch.testing.assert_close(out['targets'], own * one_hot + (1 - own) * one_hot.flip(0))


@pytest.mark.parametrize('seed', range(5))
def test_cutmix_target_weight_is_the_share_of_own_pixels(seed):
    torch.manual_seed(seed)
    batch = distinct_batch(size=16)
    out = build([dict(type='CutMix', alpha=1.0)])(batch)
    for index, (image, target) in enumerate(zip(out['images'], out['targets'])):
        own_share = (image[0] == index).float().mean().item()
        assert target.sum().item() == pytest.approx(1.0)
        assert target[batch['targets'][index]].item() == pytest.approx(own_share)


def test_one_mixing_augment_per_batch_in_the_given_shares():
    torch.manual_seed(0)
    augment = build([dict(type='MixUp', prob=0.3), dict(type='CutMix', prob=0.5)])
    counts = {'MixUp': 0, 'CutMix': 0, None: 0}
    for _ in range(1000):
        chosen = augment._draw_mixing()
        counts[type(chosen).__name__ if chosen else None] += 1
    assert counts['MixUp'] / 1000 == pytest.approx(0.3, abs=0.05)
    assert counts['CutMix'] / 1000 == pytest.approx(0.5, abs=0.05)
    assert build([dict(type='MixUp'), dict(type='CutMix')]).probs == [0.5, 0.5]


def test_an_unmixed_batch_still_has_one_hot_soft_targets():
    batch = distinct_batch()
    out = build([dict(type='MixUp', prob=0.0)])(batch)
    assert torch.equal(out['images'], batch['images'])
    assert torch.equal(out['targets'], torch.eye(NUM_CLASSES)[batch['targets']])


def test_seeded_batch_augments_are_deterministic():
    augment = build([dict(type='RandomErasing', prob=0.5), dict(type='MixUp'), dict(type='CutMix')])
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        outputs.append([augment(dict(images=torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)),
                                     targets=torch.tensor([0, 1, 2, 3]))) for i in range(5)])
    for first, second in zip(*outputs):
        assert torch.equal(first['images'], second['images']) and torch.equal(first['targets'], second['targets'])


def test_mixing_normalised_images_is_normalising_the_mixed_float_images(monkeypatch):
    """Why mixing after the device normalisation loses nothing: both steps are affine, the weights sum to one."""
    monkeypatch.setattr(batch_augments_module, '_beta', lambda alpha: 0.37)
    generator = torch.Generator().manual_seed(0)
    uint8 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=generator)
    normalization = Normalization(IMAGENET_MEAN, IMAGENET_STD)
    on_device = to_device(dict(images=uint8, targets=torch.tensor([0, 1, 2, 3])), torch.device('cpu'), normalization)
    mixed = build([dict(type='MixUp')])(on_device)['images']
    float_images = uint8.float() / 255
    reference = F.normalize(0.37 * float_images + 0.63 * float_images.flip(0), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(mixed, reference, rtol=0, atol=1e-5)


def test_augment_batches_changes_the_device_batch_only():
    host = distinct_batch()
    pairs = augment_batches(iter([(host, dict(host))]), build([dict(type='MixUp')]))
    out_host, out_device = next(pairs)
    assert out_host is host and host['targets'].dtype == torch.int64
    assert out_device['targets'].shape == (4, NUM_CLASSES)
    assert list(augment_batches([(1, 2)], None)) == [(1, 2)]


# --- bad input --------------------------------------------------------------------------------------------------

def test_uint8_images_and_dense_targets_are_refused():
    with pytest.raises(TypeError, match='float, normalised images'):
        build([dict(type='MixUp')])(dict(images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
                                          targets=torch.tensor([0, 1])))
    with pytest.raises(TypeError, match=r'class indices LongTensor\[2\]'):
        build([dict(type='CutMix')])(dict(images=torch.zeros(2, 3, 4, 4), targets=torch.zeros(2, 4, 4).long()))


@pytest.mark.parametrize('cfgs, error, message', [
    ([dict(type='Mixup')], KeyError, r'\[0\].*names no batch augment'),
    ([dict(type='MixUp'), dict(type='CutMix', alpha=-1)], ValueError, r'\[1\]: CutMix alpha must be > 0'),
    ([dict(type='MixUp', prob=0.7), dict(type='CutMix', prob=0.6)], ValueError, 'sum to 1.3'),
    ([dict(type='MixUp', prob=0.7), dict(type='CutMix')], ValueError, 'every mixing augment or to none'),
    ([dict(type='RandomErasing', mode='zeros')], ValueError, 'mode must be'),
    (dict(type='MixUp'), TypeError, 'is a list'),
])
def test_bad_configs_name_the_entry(cfgs, error, message):
    with pytest.raises(error, match=message):
        build_batch_augments(cfgs, NUM_CLASSES, 'tasks.cls.batch_augments')


def test_tasks_read_batch_augments_and_refuse_what_cannot_be_mixed(tiny_config):
    augments = [dict(type='RandomErasing'), dict(type='MixUp', alpha=0.8), dict(type='CutMix', alpha=1.0)]
    cfg = tiny_config(**{'tasks.cls.batch_augments': augments})
    task = build_tasks(cfg.tasks, train=False, val=False)['cls']
    assert task.batch_augments == augments
    augment = batch_augment_for(task)
    assert [type(a) for a in augment.preserving + augment.mixing] == [RandomErasing, MixUp, CutMix]
    assert augment.num_classes == task.head['num_classes']

    segmentation = dict(cfg.tasks['seg'], batch_augments=[dict(type='CutMix')])
    with pytest.raises(ValueError, match="tasks.seg.batch_augments: MixUp and CutMix mix class labels"):
        build_tasks({'seg': segmentation}, train=False, val=False)
    grouped = dict(cfg.tasks['cls'], group='shared', batch_augments=[dict(type='MixUp')])
    with pytest.raises(ValueError, match="tasks.cls.batch_augments: tasks of a group"):
        build_tasks({'cls': grouped}, train=False, val=False)


def test_cutmix_box_side_follows_the_drawn_weight(monkeypatch):
    monkeypatch.setattr(batch_augments_module, '_beta', lambda alpha: 0.36)
    monkeypatch.setattr(batch_augments_module, '_randint', lambda high: high // 2)
    top, bottom, left, right = CutMix().box(20, 30)
    side = math.sqrt(1 - 0.36)
    assert (bottom - top, right - left) == (2 * (int(20 * side) // 2), 2 * (int(30 * side) // 2))


def test_loader_batches_normalised_then_augmented_give_a_finite_soft_loss(tiny_config):
    """The path the trainer takes: uint8 batches from the loader, normalised by the prefetcher, then augmented."""
    from mtvision.data.collate import collate_fn_for
    from mtvision.data.loader import build_loader
    from mtvision.data.prefetch import DevicePrefetcher
    from mtvision.models.multitask import build_model

    augments = [dict(type='RandomErasing', prob=1.0), dict(type='MixUp'), dict(type='CutMix')]
    cfg = tiny_config(**{'tasks.cls.batch_augments': augments})
    task = build_tasks({'cls': cfg.tasks['cls']}, val=False)['cls']
    loader, normalization = build_loader(task.train_dataset, batch_size=4, collate_fn=collate_fn_for(task))
    assert normalization is not None, 'the loader defers normalisation: the augments see what the device sees'
    torch.manual_seed(0)
    pairs = augment_batches(DevicePrefetcher(loader, 'cpu', normalization), batch_augment_for(task))
    host, batch = next(iter(pairs))
    assert host['images'].dtype == torch.uint8 and host['targets'].dtype == torch.int64
    assert batch['targets'].shape == (4, task.head['num_classes'])
    torch.testing.assert_close(batch['targets'].sum(1), torch.ones(4))
    loss = build_model(cfg, {'cls': task}).loss('cls', batch)['loss_cls']
    assert torch.isfinite(loss)


def test_the_trainer_mixes_a_tasks_device_batches_and_keeps_hard_host_labels(tiny_config, tmp_path):
    from mtvision.engine import Trainer

    cfg = tiny_config(**{'tasks.cls.batch_augments': [dict(type='MixUp', alpha=0.8), dict(type='CutMix', alpha=1.0)],
                         'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2, 'train_cfg.val_at_start': False})
    trainer = Trainer(cfg, tmp_path, validate=False)
    host, device_batch = next(trainer._train_iterators()['cls'])
    assert host['targets'].dtype == torch.int64  # what the loss normalisers and logs read
    targets = device_batch['targets']
    assert targets.dtype == torch.float32 and targets.shape == (2, 6)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(2))
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
