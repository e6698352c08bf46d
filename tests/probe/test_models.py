"""MODEL resolution for the probes: checkpoints, weights files and timm models, all built locally."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from mtvision.engine import Trainer
from mtvision.engine.checkpoint import read_metadata
from mtvision.probe.models import load_backbone


@pytest.fixture(scope='module')
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def checkpoint(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(**{'train_cfg.max_iters': 1}), tmp_path / 'run', validate=False)
    trainer.train()
    return trainer, tmp_path / 'run'


def test_checkpoint_work_dir_and_weights_file_give_the_trained_backbone(checkpoint, images):
    trainer, work_dir = checkpoint
    trainer.model.eval()
    expected = trainer.model.backbone(images).tokens
    for spec in (work_dir, work_dir / 'iter_1', work_dir / 'iter_1' / 'model.safetensors'):
        loaded = load_backbone(str(spec))
        torch.testing.assert_close(loaded.backbone(images).tokens, expected, rtol=0, atol=0)
        assert loaded.img_size == 64 and loaded.mean == (0.485, 0.456, 0.406)
        assert not any(p.requires_grad for p in loaded.backbone.parameters())
    assert json.loads(read_metadata(work_dir)['backbone'])['embed_dim'] == 32


def test_weights_file_without_header_needs_a_config(checkpoint, tmp_path, images):
    trainer, work_dir = checkpoint
    bare = tmp_path / 'bare.pth'
    torch.save(load_file(work_dir / 'iter_1' / 'model.safetensors'), bare)
    with pytest.raises(ValueError, match='pass --config'):
        load_backbone(str(bare))
    trainer.cfg.dump(str(tmp_path / 'config.py'))
    loaded = load_backbone(str(bare), config=str(tmp_path / 'config.py'))
    trainer.model.eval()
    torch.testing.assert_close(loaded.backbone(images).tokens, trainer.model.backbone(images).tokens)


def test_a_checkpoint_that_does_not_match_names_the_keys(checkpoint, tmp_path):
    trainer, work_dir = checkpoint
    trainer.cfg.merge_from_dict({'model.backbone.embed_dim': 64})
    trainer.cfg.dump(str(tmp_path / 'wider.py'))
    with pytest.raises(RuntimeError, match=r'does not match the model:[\s\S]*model.cls_token: checkpoint \(1, 1, 32\) '
                                           r'vs model \(1, 1, 64\)'):
        load_backbone(str(work_dir), config=str(tmp_path / 'wider.py'))


def test_timm_model_from_a_local_weights_file(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model('vit_tiny_patch16_224', num_classes=0).eval()
    save_file(reference.state_dict(), tmp_path / 'weights.safetensors')
    torch.manual_seed(1)  # a different random init, which the file must overwrite
    loaded = load_backbone(f'timm:vit_tiny_patch16_224@{tmp_path / "weights.safetensors"}')
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded.backbone(x).tokens, reference.forward_features(x))
    assert loaded.img_size == 224
    with pytest.raises(FileNotFoundError, match='no weights file'):
        load_backbone(f'timm:vit_tiny_patch16_224@{tmp_path / "missing.safetensors"}')


def test_timm_random_init_is_frozen_and_fingerprinted():
    torch.manual_seed(0)
    a = load_backbone('timm:vit_tiny_patch16_224')
    torch.manual_seed(0)
    b = load_backbone('timm:vit_tiny_patch16_224')
    torch.manual_seed(1)
    c = load_backbone('timm:vit_tiny_patch16_224')
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert not a.backbone.training and not any(p.requires_grad for p in a.backbone.parameters())


def test_unknown_model_spec():
    with pytest.raises(FileNotFoundError, match='nor timm:<name>'):
        load_backbone('no/such/run')
