"""A trained backbone exported to timm's layout loads into ``timm.create_model`` and computes the same features;
converted back, it gives the same weights."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import mtvision
from mtvision.engine import Trainer
from mtvision.models import backbone_config


def test_trained_backbone_exports_to_timm_and_back_with_the_same_features(tiny_config, tmp_path, load_tool):
    trainer = Trainer(tiny_config(**{'train_cfg.max_iters': 1}), tmp_path / 'run', validate=False)
    trainer.train()
    exporter = load_tool('model_converters/mtvision_to_timm')
    result = exporter.main([str(tmp_path / 'run'), str(tmp_path / 'timm.safetensors')])
    assert result['create_args']['num_classes'] == 0 and result['left_out'] == []

    timm_model = timm.create_model(**result['create_args']).eval()
    timm_model.load_state_dict(load_file(tmp_path / 'timm.safetensors'), strict=True)  # every key and shape
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(images),
                                   trainer.model.backbone.eval().model.forward_features(images))

    back = tmp_path / 'back.safetensors'
    load_tool('model_converters/timm_to_mtvision').main([
        str(tmp_path / 'timm.safetensors'), str(back), '--backbone-json', json.dumps(backbone_config(trainer.cfg))])
    round_trip, original = load_file(back), trainer.model.state_dict()
    assert round_trip and all(torch.equal(round_trip[key], original[key]) for key in round_trip)


def test_an_moe_backbone_is_refused_with_the_reason(tiny_config, tmp_path, load_tool):
    cfg = tiny_config(**{'train_cfg.max_iters': 1, 'model.backbone.moe': dict(blocks=[1], num_experts=2)})
    Trainer(cfg, tmp_path / 'run', validate=False).train()
    with pytest.raises(SystemExit, match='MoE backbone'):
        load_tool('model_converters/mtvision_to_timm').main([str(tmp_path / 'run'), str(tmp_path / 'out.safetensors')])
    assert not (tmp_path / 'out.safetensors').exists()


def test_a_timm_layout_file_loads_the_same_through_load_from_and_get_model(tiny_config, tmp_path, load_tool):
    """One loader for every entry point: timm's layout converts into the backbone whether the file comes through
    --load-from or get_model(pretrained=...); a whole checkpoint loads whole through both."""
    trained = Trainer(tiny_config(**{'train_cfg.max_iters': 1}), tmp_path / 'run', validate=False)
    trained.train()
    load_tool('model_converters/mtvision_to_timm').main([str(tmp_path / 'run'), str(tmp_path / 'timm.safetensors')])
    expected = {key: value for key, value in trained.model.state_dict().items() if key.startswith('backbone.')}
    tiny = {'model.backbone.embed_dim': 32, 'model.backbone.depth': 2, 'model.backbone.num_heads': 2}
    for source in (tmp_path / 'timm.safetensors', tmp_path / 'run'):
        through_trainer = Trainer(tiny_config(**{'train_cfg.max_iters': 1}), tmp_path / f'new_{source.name}',
                                  load_from=str(source), validate=False).model.state_dict()
        through_zoo = mtvision.get_model('vit-tiny-p8_4task_synthetic', pretrained=source, **tiny).state_dict()
        for key, value in expected.items():
            assert torch.equal(through_trainer[key], value) and torch.equal(through_zoo[key], value), (source, key)
