"""MODEL resolution for the probes: checkpoints, weights files and timm models, all built locally."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from mtvision.engine import Trainer
from mtvision.checkpoint import read_metadata
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
    with pytest.raises(FileNotFoundError, match='is not a file or directory, a URL, timm:<name>'):
        load_backbone('no/such/run')


def test_moe_backbone_is_probed_through_one_task_routing(tiny_config, tmp_path, images):
    # a shared router: each task's embedding row must survive the config being written back with sorted keys
    moe = {'model.backbone.moe': dict(blocks='every_other', num_experts=4, top_k=2, router='shared'),
           'train_cfg.max_iters': 1}
    trainer = Trainer(tiny_config(**moe), tmp_path / 'run', validate=False)
    trainer.train()
    with pytest.raises(ValueError, match=r"pass --task, one of \['cls', 'depth', 'det', 'seg'\]"):
        load_backbone(str(tmp_path / 'run'))
    trainer.model.eval()
    weights_file = tmp_path / 'run' / 'iter_1' / 'model.safetensors'  # its header names the routed tasks
    for spec in (tmp_path / 'run', weights_file):
        for task in ('cls', 'seg'):
            loaded = load_backbone(str(spec), task=task)
            torch.testing.assert_close(loaded.backbone(images).tokens, trainer.model.features(task, images).tokens)
    # routing differs between tasks, so do the features
    assert not torch.allclose(load_backbone(str(weights_file), task='cls').backbone(images).tokens,
                              load_backbone(str(weights_file), task='seg').backbone(images).tokens)


def test_dense_timm_weights_upcycle_into_an_moe_vit(tmp_path):
    from mtvision.models.backbones import ViT
    from mtvision.models.moe import moe_layers

    torch.manual_seed(0)
    dense = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=4, num_classes=0).eval()
    save_file(dense.state_dict(), tmp_path / 'dense.safetensors')
    torch.manual_seed(1)
    moe = ViT('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=4, tasks=['a', 'b'],
              pretrained_file=str(tmp_path / 'dense.safetensors'),
              moe=dict(blocks='every_other', num_experts=4, top_k=2)).eval()
    assert [name for name, _ in moe_layers(moe)] == ['model.blocks.1.mlp', 'model.blocks.3.mlp']
    x = torch.randn(2, 3, 32, 32)
    from mtvision.models.moe import routing_task
    for task in ('a', 'b'):
        with routing_task(moe, task):
            torch.testing.assert_close(moe(x).tokens, dense.forward_features(x), rtol=1e-5, atol=1e-5)
