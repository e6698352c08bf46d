import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mtvision.data import DepthDataset, SegmentationDataset, generate_synthetic
from mtvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtvision.evaluation import SegmentationMetric
from mtvision.models.backbones.base import BackboneOutput
from mtvision.models.backbones.vit import ViT
from mtvision.probe.dense import LinearDenseHead, extract_dense_features, train_dense_probe

NORMALIZE = [dict(type='ToFloat'), dict(type='Normalize', mean=IMAGENET_MEAN, std=IMAGENET_STD)]
NUM_SHAPES = 2  # synthetic shape classes; segmentation adds the background


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('synthetic')
    generate_synthetic(root, seed=0, num_train=8, num_val=4, image_size=32, num_classes=NUM_SHAPES)
    return root


def _tiny_vit() -> ViT:
    torch.manual_seed(0)
    return ViT('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()


def _segmentation_sets(root: Path) -> tuple[SegmentationDataset, SegmentationDataset]:
    return tuple(SegmentationDataset(root / 'segmentation/images' / split, root / 'segmentation/annotations' / split,
                                     NUM_SHAPES + 1, pipeline=NORMALIZE) for split in ('train', 'val'))


def _stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([image.as_subclass(torch.Tensor) for image in images]), torch.stack(
        [target.as_subclass(torch.Tensor) for target in targets])


def _backbone_output(feature_map: torch.Tensor, images: torch.Tensor) -> BackboneOutput:
    tokens = feature_map.flatten(2).transpose(1, 2)
    return BackboneOutput(maps=[feature_map], tokens=tokens, cls_token=None, pooled=tokens.mean(dim=1),
                          image_size=tuple(images.shape[-2:]))


def test_segmentation_probe_learns_and_reports_the_metric_of_its_own_predictions(synthetic):
    vit = _tiny_vit()
    train, val = _segmentation_sets(synthetic)
    head = LinearDenseHead(vit.embed_dim, NUM_SHAPES + 1, torch.Generator().manual_seed(0))
    initial = copy.deepcopy(head)
    metrics = train_dense_probe(vit, 'segmentation', train, val, epochs=30, batch_size=4, lr=2e-2, head=head,
                                feature_dtype=torch.float32, progress=False)

    # recomputed without the feature cache: one forward pass over each whole set
    with torch.no_grad():
        images, labels = _stack(train)
        feature_map = vit(images).maps[-1]
        losses = [F.cross_entropy(h.eval()(feature_map, labels.shape[-2:]), labels, ignore_index=255)
                  for h in (initial, head)]
        images, labels = _stack(val)
        predictions = head.eval()(vit(images).maps[-1], labels.shape[-2:]).argmax(dim=1)
    assert losses[1] < 0.5 * losses[0]
    reference = SegmentationMetric(NUM_SHAPES + 1)
    reference.update(predictions, labels)
    expected = reference.compute()
    assert set(metrics) == {'mIoU', 'mAcc', 'aAcc'}
    assert metrics == pytest.approx(expected, abs=1e-6)


class BlockLabels(Dataset):
    """Random classes constant on every ``patch x patch`` block of the image, which holds the class id in all three
    channels; the label map repeats each block's class ``label_scale`` times per side (the image's size when it is
    ``patch``, the feature map's when 1), with 5% of its pixels ignored."""

    def __init__(self, num_images: int, num_classes: int, label_scale: int, grid: int = 4, patch: int = 8,
                 seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.blocks = torch.randint(num_classes, (num_images, grid, grid), generator=generator)
        self.patch = patch
        labels = self.blocks.repeat_interleave(label_scale, dim=1).repeat_interleave(label_scale, dim=2)
        ignored = torch.rand(labels.shape, generator=generator) < 0.05
        self.labels = torch.where(ignored, 255, labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.blocks[index].repeat_interleave(self.patch, dim=0).repeat_interleave(self.patch, dim=1)
        return image.float().expand(3, -1, -1), self.labels[index]


class OneHotBackbone(nn.Module):
    """Patch features that are the one-hot code of each patch's class, read back from the image."""

    def __init__(self, num_classes: int, patch: int = 8):
        super().__init__()
        self.num_classes, self.patch = num_classes, patch

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        classes = F.avg_pool2d(images[:, 0], self.patch).round().long()
        return _backbone_output(F.one_hot(classes, self.num_classes).permute(0, 3, 1, 2).float(), images)


@pytest.mark.parametrize('label_scale', [1, 8])
def test_segmentation_probe_on_features_that_encode_the_label_reaches_the_best_possible_accuracy(label_scale):
    num_classes = 4
    backbone = OneHotBackbone(num_classes)
    val = BlockLabels(8, num_classes, label_scale, seed=1)
    metrics = train_dense_probe(backbone, 'segmentation', BlockLabels(16, num_classes, label_scale), val,
                                num_classes=num_classes, epochs=30, batch_size=4, lr=0.05, progress=False)
    # the best a linear head can do: logits proportional to the one-hot code. Upsampled bilinearly to image-size
    # labels they err near block corners; at feature-map size they are exact.
    images = torch.stack([val[i][0] for i in range(len(val))])
    logits = F.interpolate(10 * backbone(images).maps[-1], size=val.labels.shape[-2:], mode='bilinear',
                           align_corners=False)
    oracle = SegmentationMetric(num_classes)
    oracle.update(logits.argmax(dim=1), val.labels)
    best = oracle.compute()
    if label_scale == 1:
        assert best['aAcc'] == 100.0
    assert metrics['aAcc'] >= best['aAcc'] - 0.5
    assert metrics['mIoU'] >= best['mIoU'] - 1.0


class LogDepthImages(Dataset):
    """Smooth depth maps in 0.5-8 m with 10% invalid (0) pixels; the image holds the log-depth in all channels."""

    def __init__(self, num_images: int, size: int = 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(num_images, 1, 4, 4, generator=generator) * (2 * torch.log(torch.tensor(4.0)))
        log_depth = F.interpolate(coarse, size=(size, size), mode='bilinear', align_corners=False) - 0.69
        invalid = torch.rand(log_depth.shape, generator=generator) < 0.1
        self.depth = torch.where(invalid, 0.0, log_depth.exp())
        self.log_depth = log_depth

    def __len__(self) -> int:
        return len(self.depth)

    def __getitem__(self, index: int):
        return self.log_depth[index].expand(3, -1, -1), self.depth[index]


class FirstChannelBackbone(nn.Module):
    """A stride-1 feature map: the image's first channel (the log-depth of LogDepthImages)."""

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        return _backbone_output(images[:, :1], images)


def test_depth_probe_on_log_depth_features_is_exact():
    metrics = train_dense_probe(FirstChannelBackbone(), 'depth', LogDepthImages(16), LogDepthImages(8, seed=1),
                                epochs=40, batch_size=4, lr=0.05, progress=False)
    assert {'abs_rel', 'rmse', 'delta1'} <= set(metrics)
    assert metrics['abs_rel'] < 1e-3
    assert metrics['delta1'] == pytest.approx(1.0)


class LabelsFromList(Dataset):
    def __init__(self, labels: list[torch.Tensor]):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.zeros(3, 8, 8), self.labels[index]


def test_labels_beyond_a_byte_in_a_later_batch_are_kept():
    labels = [torch.full((8, 8), 1), torch.full((8, 8), 2), torch.full((8, 8), 300)]
    features = extract_dense_features(FirstChannelBackbone(), LabelsFromList(labels),
                                      'segmentation', batch_size=2, progress=False)
    assert torch.equal(features.targets.long(), torch.stack(labels))


def test_bad_arguments_are_named():
    dataset = LabelsFromList([torch.zeros(8, 8, dtype=torch.long)])
    with pytest.raises(ValueError, match="'detection'"):
        train_dense_probe(OneHotBackbone(2), 'detection', dataset, dataset)
    with pytest.raises(ValueError, match='num_classes'):
        train_dense_probe(OneHotBackbone(2), 'segmentation', dataset, dataset)


@pytest.fixture
def fake_load_backbone(monkeypatch):
    """``load_backbone`` returning the tiny ViT, patched into mtvision.probe.models (a stand-in module until the
    real one exists)."""
    calls = []

    def load_backbone(spec, config=None, task=None):
        calls.append((spec, config, task))
        return types.SimpleNamespace(backbone=_tiny_vit(), fingerprint='tiny', mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                     img_size=32)

    try:
        import mtvision.probe.models as models
    except ModuleNotFoundError as error:
        if error.name != 'mtvision.probe.models':
            raise
        models = types.ModuleType('mtvision.probe.models')
        monkeypatch.setitem(sys.modules, 'mtvision.probe.models', models)
    monkeypatch.setattr(models, 'load_backbone', load_backbone, raising=False)
    return calls


def test_tool_runs_the_probe_it_describes_and_writes_it(synthetic, tmp_path, fake_load_backbone, capsys, load_tool):
    out = tmp_path / 'results' / 'depth.json'
    results = load_tool('dense_probe').main([
        'timm:tiny', '--task', 'depth', '--task-type', 'depth', '--data', str(synthetic / 'depth'), '--epochs', '3',
        '--batch-size', '4', '--lr', '0.01', '--max-depth', '20', '--out', str(out), '--no-progress'])
    assert fake_load_backbone == [('timm:tiny', None, 'depth')]
    pipeline = [dict(type='Resize', size=(32, 32), antialias=True), *NORMALIZE]
    train, val = (DepthDataset(synthetic / 'depth' / split / 'rgb', synthetic / 'depth' / split / 'depth',
                               pipeline=pipeline) for split in ('train', 'val'))
    expected = train_dense_probe(_tiny_vit(), 'depth', train, val, epochs=3, batch_size=4, lr=0.01, max_depth=20.0,
                                 progress=False)
    assert results['metrics'] == pytest.approx(expected, rel=1e-6)
    assert (results['num_train'], results['num_val']) == (len(train), len(val))
    assert json.loads(out.read_text()) == results
    printed = capsys.readouterr().out
    assert 'AdamW' in printed and f"{expected['abs_rel']:.4g}" in printed


def test_tool_requires_num_classes_for_segmentation(capsys, load_tool):
    with pytest.raises(SystemExit):
        load_tool('dense_probe').parse_args(['timm:tiny', '--task-type', 'segmentation', '--data', 'x'])
    assert '--num-classes' in capsys.readouterr().err
