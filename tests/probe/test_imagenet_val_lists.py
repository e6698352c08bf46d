"""The probe tools on ImageNet as downloaded: a flat val folder labelled by a list (--val-ann-file)."""
import importlib.util
import shutil
import types
from pathlib import Path

import pytest
import torch

import mtvision.probe.models as models
from mtvision.data import DataError
from mtvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtvision.models.backbones.vit import ViT

_spec = importlib.util.spec_from_file_location('imagenet_replica',
                                               Path(__file__).resolve().parents[1] / 'imagenet_replica.py')
replica = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replica)  # tests run under --import-mode=importlib: no sibling imports


@pytest.fixture
def tiny_backbone(monkeypatch):
    """load_backbone replaced by one tiny random ViT (the same weights on every call)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = ViT(model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2,
                       num_heads=2).eval()
    monkeypatch.setattr(models, 'load_backbone', lambda spec, config=None, task=None: types.SimpleNamespace(
        backbone=backbone, fingerprint='tiny-random', mean=IMAGENET_MEAN, std=IMAGENET_STD, img_size=32))


def as_class_folders(layout: dict, root: Path) -> Path:
    """The layout's val images copied into <wnid> folders: what the tools read before --val-ann-file."""
    for path, label in layout['val_samples']:
        (root / replica.WNIDS[label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / replica.WNIDS[label] / path.name)
    return root


def data_arguments(layout_name: str, layout: dict) -> list[str]:
    if layout_name == 'kaggle':  # --data ILSVRC/Data/CLS-LOC holds train/ and val/
        return ['--data', str(layout['train'].parent), '--val-ann-file', str(layout['ann_file'])]
    return ['--data', str(layout['train']), '--val', str(layout['val']), '--val-ann-file', str(layout['ann_file'])]


@pytest.mark.parametrize('layout_name', sorted(replica.LAYOUTS))
def test_knn_on_a_val_list_equals_knn_on_the_same_images_in_class_folders(tmp_path, tiny_backbone, load_tool,
                                                                          layout_name):
    layout = replica.LAYOUTS[layout_name](tmp_path / 'imagenet')
    common = ['timm:tiny', '--ks', '1', '3', '--num-workers', '0', '--batch-size', '4', '--feature', 'avgpool',
              '--cache-dir', str(tmp_path / 'cache')]
    from_list = load_tool('knn').main([*common, *data_arguments(layout_name, layout)])
    folders = as_class_folders(layout, tmp_path / 'val_folders')
    from_folders = load_tool('knn').main([*common, '--data', str(layout['train']), '--val', str(folders)])
    assert (from_list['num_train'], from_list['num_val'], from_list['num_classes']) == (9, 6, 3)
    assert from_list['results'] == from_folders['results']


def test_linear_probe_reads_the_val_list_and_rejects_unknown_wnids(tmp_path, tiny_backbone, load_tool):
    layout = replica.make_kaggle_layout(tmp_path / 'imagenet')
    argv = ['timm:tiny', *data_arguments('kaggle', layout), '--protocol', 'mae', '--epochs', '1',
            '--warmup-epochs', '0', '--batch-size', '4', '--optimizer', 'sgd', '--num-workers', '0', '--no-progress']
    results = load_tool('linear_probe').main(argv)
    assert results['val'] == str(layout['val']) and 0 <= results['top1'] <= 100
    # a wnid the training folders lack: the val labels could not index the training classes
    layout['ann_file'].write_text(layout['ann_file'].read_text().replace(replica.WNIDS[2], 'n01491361'))
    with pytest.raises(DataError, match="line [0-9]+: wnid 'n01491361' is not among the 3 classes"):
        load_tool('linear_probe').main(argv)
