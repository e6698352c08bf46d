import hashlib
import json
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import resize_rel_pos_bias_table

from mtvision.checkpoint import read_weights
from mtvision.models.backbones.swin import Swin
from mtvision.models.backbones.vit import ViT
from mtvision.models.moe import MoEMlp
from mtvision.probe.models import load_backbone
from mtvision.zoo import load_weights_file
from mtvision.zoo.convert import convert_timm_state_dict

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / 'configs' / 'quickstart' / 'vit-tiny-p8_4task_synthetic.py'
TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
TINY_SWIN = dict(img_size=32, patch_size=4, window_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2))
DINOV2 = dict(img_size=28, depth=2, embed_dim=32, num_heads=2)
CONVERTER = 'model_converters/timm_to_mtvision'  # under tools/


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` in eval mode with every parameter random: zero-initialised biases, layer scales or tokens would
    hide a weight that is not carried over."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def timm_vit(**overrides) -> torch.nn.Module:
    return randomized(timm.create_model('vit_tiny_patch16_224', num_classes=10, **{**TINY_VIT, **overrides}))


def images(size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_vit_of_the_same_geometry_gives_timms_tokens_exactly(tmp_path):
    source = timm_vit()
    save_file(source.state_dict(), tmp_path / 'vit.safetensors')
    backbone = ViT('vit_tiny_patch16_224', **TINY_VIT).eval()
    state = convert_timm_state_dict(load_weights_file(tmp_path / 'vit.safetensors'), backbone)
    assert set(state) == set(backbone.state_dict())  # the classifier head.* is dropped
    backbone.load_state_dict(state)
    x = images()
    with torch.no_grad():
        assert torch.equal(backbone(x).tokens, source.forward_features(x))


def test_other_image_size_resamples_the_pos_embed_bicubically_keeping_the_class_token():
    source = timm_vit()
    backbone = ViT('vit_tiny_patch16_224', **{**TINY_VIT, 'img_size': 48})
    state = convert_timm_state_dict(source.state_dict(), backbone)
    backbone.load_state_dict(state)
    old = source.pos_embed.detach()  # [1, 1 + 4 * 4, C]
    grid = old[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode='bicubic', antialias=True, align_corners=False)
    expected = torch.cat([old[:, :1], expected.flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(backbone.model.pos_embed.detach(), expected)
    assert torch.equal(backbone.model.pos_embed[:, 0], old[:, 0])


def test_larger_patches_get_a_patch_embedding_that_sees_an_upsampled_patch_as_the_original():
    # FlexiViT's pseudo-inverse resize: <resize(x), resize_pinv(w)> == <x, w> when the patch grows
    source = timm_vit()
    backbone = ViT('vit_tiny_patch16_224', **{**TINY_VIT, 'patch_size': 16})
    backbone.load_state_dict(convert_timm_state_dict(source.state_dict(), backbone))
    assert backbone.grid_size == (2, 2) and backbone.model.pos_embed.shape == (1, 1 + 4, 32)
    patch = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    upsampled = F.interpolate(patch, size=(16, 16), mode='bicubic', antialias=True, align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model.patch_embed.proj(upsampled), source.patch_embed.proj(patch),
                                   atol=1e-4, rtol=1e-4)


def test_deit3_layer_scales_are_renamed_and_training_wrappers_unwrapped():
    source = timm_vit(init_values=0.1)
    released = {re.sub(r'ls([12])\.gamma', r'gamma_\1', key): value for key, value in source.state_dict().items()}
    assert 'blocks.1.gamma_2' in released
    backbone = ViT('vit_tiny_patch16_224', **TINY_VIT, init_values=0.1).eval()
    backbone.load_state_dict(convert_timm_state_dict({'model': released, 'epoch': 300}, backbone))
    x = images()
    with torch.no_grad():
        assert torch.equal(backbone(x).tokens, source.forward_features(x))


def test_mae_pretraining_checkpoint_loses_its_decoder_and_mask_token():
    source = timm_vit()
    plain = convert_timm_state_dict(source.state_dict(), ViT('vit_tiny_patch16_224', **TINY_VIT))
    mae = dict(source.state_dict(), mask_token=torch.zeros(1, 1, 16), decoder_pos_embed=torch.zeros(1, 17, 16),
               **{'decoder_embed.weight': torch.zeros(16, 32), 'decoder_blocks.0.attn.qkv.weight': torch.zeros(48, 16),
                  'decoder_norm.weight': torch.ones(16), 'decoder_pred.weight': torch.zeros(192, 16)})
    converted = convert_timm_state_dict(mae, ViT('vit_tiny_patch16_224', **TINY_VIT))
    assert converted.keys() == plain.keys()
    assert all(torch.equal(converted[key], plain[key]) for key in plain)
    assert 'mask_token' in mae  # timm's DINOv2 branch pops it: the caller's dict must be left alone


def test_mae_finetuned_fc_norm_becomes_the_token_norm():
    source = timm_vit()
    state = {key.replace('norm.', 'fc_norm.') if key.startswith('norm.') else key: value
             for key, value in source.state_dict().items()}
    assert 'fc_norm.weight' in state and 'norm.weight' not in state
    backbone = ViT('vit_tiny_patch16_224', **TINY_VIT)
    backbone.load_state_dict(convert_timm_state_dict(state, backbone))
    assert torch.equal(backbone.model.norm.weight, source.norm.weight)
    assert torch.equal(backbone.model.norm.bias, source.norm.bias)


def test_dinov2_release_with_registers_matches_timms_model():
    source = randomized(timm.create_model('vit_small_patch14_reg4_dinov2', **DINOV2))
    assert source.no_embed_class and source.num_prefix_tokens == 5
    # the released layout: pos_embed has a slot for the class token, which timm folds into cls_token
    state = source.state_dict()
    cls_position = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(3))
    released = {key: value for key, value in state.items() if key not in ('reg_token', 'cls_token', 'pos_embed')}
    released.update(register_tokens=state['reg_token'], cls_token=state['cls_token'] - cls_position[0],
                    pos_embed=torch.cat([cls_position, state['pos_embed']], dim=1), mask_token=torch.zeros(1, 32))
    backbone = ViT('vit_small_patch14_reg4_dinov2', **DINOV2).eval()
    converted = convert_timm_state_dict(released, backbone)
    backbone.load_state_dict(converted)
    assert torch.equal(converted['model.blocks.1.ls2.gamma'],
                       state['blocks.1.ls2.gamma'])
    x = images(28)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x).tokens, source.forward_features(x), atol=1e-5, rtol=1e-5)


def test_swin_round_trip_gives_timms_tokens_and_keeps_the_mask_token():
    source = randomized(timm.create_model('swin_tiny_patch4_window7_224', num_classes=10, **TINY_SWIN))
    backbone = Swin('swin_tiny_patch4_window7_224', out_indices=(0, 1), **TINY_SWIN).eval()
    mask_token = backbone.mask_token.detach().clone()
    state = convert_timm_state_dict(source.state_dict(), backbone)
    backbone.load_state_dict(state)
    assert torch.equal(backbone.mask_token, mask_token)
    x = images()
    with torch.no_grad():
        assert torch.equal(backbone(x).tokens, source.forward_features(x).flatten(1, 2))


def test_swin_in_microsofts_released_layout_is_renamed_to_timms():
    source = randomized(timm.create_model('swin_tiny_patch4_window7_224', num_classes=10, **TINY_SWIN))
    # the original repository downsamples at the end of a stage, names the classifier head.*, and saves buffers
    released = {key.replace('layers.1.downsample', 'layers.0.downsample').replace('head.fc.', 'head.'): value
                for key, value in source.state_dict().items()}
    assert 'layers.0.downsample.reduction.weight' in released
    released['layers.0.blocks.0.attn.relative_position_index'] = torch.zeros(4, 4, dtype=torch.long)
    released['layers.1.blocks.0.attn_mask'] = torch.zeros(4, 1, 1)
    backbone = Swin('swin_tiny_patch4_window7_224', out_indices=(0, 1), **TINY_SWIN).eval()
    backbone.load_state_dict(convert_timm_state_dict(released, backbone))
    x = images()
    with torch.no_grad():
        assert torch.equal(backbone(x).tokens, source.forward_features(x).flatten(1, 2))


def test_swin_relative_position_bias_tables_follow_a_larger_window():
    source = randomized(timm.create_model('swin_tiny_patch4_window7_224', num_classes=10, **TINY_SWIN))
    table = source.layers[0].blocks[0].attn.relative_position_bias_table.detach()  # [(2*2-1)^2, heads]
    state = dict(source.state_dict())
    state['layers.1.blocks.0.attn.relative_position_bias_table'] = torch.full((9, 2), 0.25)
    backbone = Swin('swin_tiny_patch4_window7_224', out_indices=(0, 1), **{**TINY_SWIN, 'window_size': 4})
    converted = convert_timm_state_dict(state, backbone)
    resized = converted['model.layers.0.blocks.0.attn.relative_position_bias_table']
    assert resized.shape == (7 * 7, 1)
    torch.testing.assert_close(resized, resize_rel_pos_bias_table(table, (4, 4), (49, 1)))
    # interpolation keeps the bias of offset (0, 0) and a constant table constant
    assert torch.equal(resized.reshape(7, 7)[3, 3], table.reshape(3, 3)[1, 1])
    torch.testing.assert_close(converted['model.layers.1.blocks.0.attn.relative_position_bias_table'],
                               torch.full((49, 2), 0.25))


def test_unmatched_missing_and_misshapen_keys_are_all_named():
    state = dict(timm_vit().state_dict())
    state['blocks.0.attn.extra.weight'] = torch.zeros(3)
    state['decoder'] = torch.zeros(1)  # not MAE's decoder_* layout: unmatched, not dropped
    del state['blocks.1.norm1.bias']
    state['blocks.0.mlp.fc1.weight'] = torch.zeros(64, 32)
    with pytest.raises(ValueError) as error:
        convert_timm_state_dict(state, ViT('vit_tiny_patch16_224', **TINY_VIT))
    message = str(error.value)
    assert 'not in the backbone: blocks.0.attn.extra.weight, decoder' in message
    assert 'missing from the weights: blocks.1.norm1.bias' in message
    assert 'blocks.0.mlp.fc1.weight: weights (64, 32) vs backbone (128, 32)' in message


def test_moe_backbone_gets_every_expert_as_the_dense_mlp():
    source = timm_vit()
    backbone = ViT('vit_tiny_patch16_224', **TINY_VIT, moe=dict(blocks=[1], num_experts=3, top_k=1), tasks=['a'])
    backbone.load_state_dict(convert_timm_state_dict(source.state_dict(), backbone))
    layer = backbone.model.blocks[1].mlp
    assert isinstance(layer, MoEMlp)
    for expert in range(3):
        assert torch.equal(layer.w1[expert], source.blocks[1].mlp.fc1.weight.t())
        assert torch.equal(layer.b2[expert], source.blocks[1].mlp.fc2.bias)


def test_tool_writes_a_file_the_probes_load_as_timms_backbone(tmp_path, capsys, load_tool):
    source = timm_vit()
    torch.save({'model': source.state_dict(), 'epoch': torch.tensor(3)}, tmp_path / 'timm.pth')
    out = tmp_path / 'converted' / 'vit.safetensors'
    options = [f'model.backbone.{key}={value}' for key, value in TINY_VIT.items()]
    result = load_tool(CONVERTER).main([str(tmp_path / 'timm.pth'), str(out), '--config', str(QUICKSTART),
                                        '--cfg-options', *options, 'model.backbone.pretrained=True'])
    assert f'sha256: {hashlib.sha256(out.read_bytes()).hexdigest()}' in capsys.readouterr().out
    assert result['sha256'] == hashlib.sha256(out.read_bytes()).hexdigest()
    with safe_open(out, framework='pt') as f:
        header = f.metadata()
    expected_cfg = dict(type='ViT', model_name='vit_tiny_patch16_224', out_indices=[-1], **TINY_VIT)
    assert header['format'] == 'mtvision' and json.loads(header['backbone']) == expected_cfg  # pretrained dropped
    assert all(key.startswith('backbone.model.') for key in read_weights(out))

    loaded = load_backbone(str(out)).backbone
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x).tokens, source.forward_features(x))


def test_tool_reads_a_timm_model_with_a_local_file_and_a_json_backbone(tmp_path, load_tool):
    source = timm_vit()
    save_file(source.state_dict(), tmp_path / 'timm.safetensors')
    backbone_json = json.dumps(dict(type='ViT', model_name='vit_tiny_patch16_224', **{**TINY_VIT, 'img_size': 48}))
    out = tmp_path / 'vit48.safetensors'
    load_tool(CONVERTER).main([f'timm:vit_tiny_patch16_224@{tmp_path / "timm.safetensors"}', str(out),
                               '--backbone-json', backbone_json, '--src-kwargs', json.dumps(TINY_VIT)])
    loaded = load_backbone(str(out)).backbone
    assert loaded.grid_size == (6, 6)
    expected = F.interpolate(source.pos_embed[:, 1:].detach().reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(6, 6),
                             mode='bicubic', antialias=True, align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(loaded.model.pos_embed[:, 1:], expected)
    assert torch.equal(loaded.model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_tool_refuses_bad_arguments_by_name(tmp_path, load_tool):
    tool = load_tool(CONVERTER)
    with pytest.raises(SystemExit, match=r"OUT must be a \.safetensors file, got '.*x\.pth'"):
        tool.main(['timm:vit_tiny_patch16_224', str(tmp_path / 'x.pth'), '--backbone-json', '{"type": "ViT"}'])
    with pytest.raises(SystemExit, match="'vit_nonexistent_model' is not a timm model name"):
        tool.main(['timm:vit_nonexistent_model', str(tmp_path / 'x.safetensors'), '--backbone-json',
                   '{"type": "ViT", "depth": 1, "embed_dim": 16, "num_heads": 1}'])
    save_file(timm_vit().state_dict(), tmp_path / 'timm.safetensors')
    deeper = json.dumps(dict(type='ViT', model_name='vit_tiny_patch16_224', **{**TINY_VIT, 'depth': 3}))
    with pytest.raises(SystemExit, match=r'missing from the weights: blocks\.2\.attn\.proj\.bias, '):
        tool.main([str(tmp_path / 'timm.safetensors'), str(tmp_path / 'x.safetensors'), '--backbone-json', deeper])
    assert not (tmp_path / 'x.safetensors').exists()
    with pytest.raises(SystemExit, match='--backbone-json is not valid JSON'):
        tool.main(['timm:vit_tiny_patch16_224', str(tmp_path / 'x.safetensors'), '--backbone-json', '{type: ViT}'])
