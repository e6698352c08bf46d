"""Layer-wise learning-rate decay and per-key multipliers: every parameter's learning rate and weight decay against
layer ids worked out here from the parameter names (regular expressions over timm's naming), not from the
optimizer's module walk."""
import logging
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from mtvision.config import check_config
from mtvision.models.multitask import MultiTaskModel
from mtvision.optim import build_optimizer, scheduled_lr

LR, WEIGHT_DECAY, RATE = 1e-3, 0.05, 0.5
VIT = dict(type='ViT', model_name='vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=3,
           num_heads=2)
SWIN_CONFIG = Path(__file__).resolve().parents[2] / 'configs' / '_base_' / 'models' / 'swin-tiny-w4_64px.py'
SWIN_DEPTHS = (2, 1, 2, 1)
HEADS = dict(cls=dict(type='ClassificationHead', num_classes=3),
             moco=dict(type='MoCoV3Head', hidden_dim=16, out_dim=8))  # a momentum backbone the optimizer skips


def vit_model(**backbone) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel({**VIT, **backbone}, HEADS)


def swin_model() -> MultiTaskModel:
    torch.manual_seed(0)
    backbone = Config.fromfile(str(SWIN_CONFIG)).model.backbone.to_dict()
    backbone.update(embed_dim=16, depths=SWIN_DEPTHS, num_heads=(1, 1, 1, 1), drop_path_rate=0.0)
    return MultiTaskModel(backbone, dict(cls=HEADS['cls']))


def vit_layer_id(name: str, depth: int = 3) -> int:
    """MAE's ``get_layer_id_for_vit``: stem 0, ``blocks.i`` i + 1, anything else depth + 1."""
    if match := re.match(r'backbone\.model\.blocks\.(\d+)\.', name):
        return int(match[1]) + 1
    if re.match(r'backbone\.model\.(cls_token|pos_embed|patch_embed)', name):
        return 0
    return depth + 1


def swin_layer_id(name: str, depths=SWIN_DEPTHS) -> int:
    """SimMIM's ``get_swin_layer`` in timm's naming: blocks numbered across stages from 1, a stage's downsample
    (timm runs it at the start of the stage) the id of the previous stage's last block."""
    if match := re.match(r'backbone\.model\.layers\.(\d+)\.blocks\.(\d+)\.', name):
        return sum(depths[:int(match[1])]) + int(match[2]) + 1
    if match := re.match(r'backbone\.model\.layers\.(\d+)\.downsample\.', name):
        return sum(depths[:int(match[1])])
    if re.match(r'backbone\.(mask_token|model\.patch_embed)', name):
        return 0
    return sum(depths) + 1


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """The group of each parameter (by id); fails on a parameter in two groups."""
    groups = {}
    for group in optimizer.param_groups:
        for param in group['params']:
            assert id(param) not in groups, 'a parameter in two groups'
            groups[id(param)] = group
    return groups


@pytest.mark.parametrize('make_model, expected_id, num_layers', [
    (vit_model, vit_layer_id, 3),
    (lambda: vit_model(moe=dict(blocks='every_other', num_experts=2)), vit_layer_id, 3),
    (swin_model, swin_layer_id, sum(SWIN_DEPTHS)),
], ids=['vit', 'vit-moe', 'swin'])
def test_every_trained_parameter_gets_the_learning_rate_of_its_layer(make_model, expected_id, num_layers):
    model = make_model()
    optimizer = build_optimizer(model, dict(type='AdamW', lr=LR, weight_decay=WEIGHT_DECAY),
                                dict(layer_decay_rate=RATE))
    groups = group_of(optimizer)
    trained = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert set(groups) == {id(param) for param in trained.values()}  # each in exactly one group, frozen ones in none
    for name, param in trained.items():
        layer_id = expected_id(name)
        group = groups[id(param)]
        assert group['layer_id'] == layer_id, name
        assert group['lr'] == pytest.approx(LR * RATE ** (num_layers + 1 - layer_id)), name
        assert group['lr_scale'] == pytest.approx(RATE ** (num_layers + 1 - layer_id)), name
    if model.is_moe:  # the experts replace block 1's MLP and keep its layer
        experts = [name for name in trained if '.mlp.' in name and name.startswith('backbone.model.blocks.1.')]
        assert experts and all(groups[id(trained[name])]['layer_id'] == 2 for name in experts)


def test_representative_names_by_hand():
    vit, swin = vit_model(), swin_model()
    vit_groups, swin_groups = group_of(build_optimizer(vit, dict(lr=LR), dict(layer_decay_rate=RATE))), group_of(
        build_optimizer(swin, dict(lr=LR), dict(layer_decay_rate=RATE)))
    vit_params, swin_params = dict(vit.named_parameters()), dict(swin.named_parameters())
    # ViT, depth 3: ids 0 (stem) .. 4 (final norm, heads); lr = LR * 0.5 ** (4 - id)
    for name, layer_id in {'backbone.model.patch_embed.proj.weight': 0, 'backbone.model.cls_token': 0,
                           'backbone.model.pos_embed': 0, 'backbone.model.blocks.0.attn.qkv.weight': 1,
                           'backbone.model.blocks.2.mlp.fc2.bias': 3, 'backbone.model.norm.weight': 4,
                           'heads.cls.fc.weight': 4, 'heads.moco.projector.0.weight': 4}.items():
        assert vit_groups[id(vit_params[name])]['lr'] == pytest.approx(LR * 0.5 ** (4 - layer_id)), name
    # Swin, depths 2-1-2-1 (6 blocks): ids 0 .. 7
    for name, layer_id in {'backbone.mask_token': 0, 'backbone.model.patch_embed.proj.weight': 0,
                           'backbone.model.layers.0.blocks.1.attn.qkv.weight': 2,
                           'backbone.model.layers.1.downsample.reduction.weight': 2,
                           'backbone.model.layers.2.blocks.0.mlp.fc1.weight': 4,
                           'backbone.model.layers.3.downsample.norm.weight': 5,
                           'backbone.model.norm.bias': 7, 'heads.cls.fc.bias': 7}.items():
        assert swin_groups[id(swin_params[name])]['lr'] == pytest.approx(LR * 0.5 ** (7 - layer_id)), name


def test_custom_keys_multiply_the_layer_rate_longest_key_first():
    model = vit_model()
    custom_keys = {'heads': dict(lr_mult=10.0), 'heads.cls': dict(lr_mult=3.0, decay_mult=0.5),
                   'qkv': dict(lr_mult=2.0, decay_mult=0.0)}
    groups = group_of(build_optimizer(model, dict(type='AdamW', lr=LR, weight_decay=WEIGHT_DECAY),
                                      dict(layer_decay_rate=RATE, custom_keys=custom_keys)))
    expected = {  # name: (lr, weight decay)
        'heads.cls.fc.weight': (3 * LR, 0.5 * WEIGHT_DECAY),
        'heads.cls.fc.bias': (3 * LR, 0.0),  # decay_mult scales a decay; a bias has none
        'heads.moco.projector.0.weight': (10 * LR, WEIGHT_DECAY),
        'backbone.model.blocks.0.attn.qkv.weight': (2 * LR * 0.5 ** 3, 0.0),
        'backbone.model.blocks.2.attn.qkv.weight': (2 * LR * 0.5, 0.0),
        'backbone.model.blocks.2.attn.proj.weight': (LR * 0.5, WEIGHT_DECAY),
        'backbone.model.patch_embed.proj.weight': (LR * 0.5 ** 4, WEIGHT_DECAY),
    }
    params = dict(model.named_parameters())
    for name, (lr, weight_decay) in expected.items():
        group = groups[id(params[name])]
        assert (group['lr'], group['weight_decay']) == (pytest.approx(lr), pytest.approx(weight_decay)), name


def test_custom_keys_alone_keep_one_learning_rate_per_key():
    model = vit_model()
    optimizer = build_optimizer(model, dict(lr=LR, weight_decay=WEIGHT_DECAY),
                                dict(custom_keys={'heads.cls': dict(lr_mult=10.0)}))
    params, groups = dict(model.named_parameters()), group_of(optimizer)
    assert groups[id(params['heads.cls.fc.weight'])]['lr'] == pytest.approx(10 * LR)
    assert groups[id(params['backbone.model.blocks.0.attn.qkv.weight'])]['lr'] == pytest.approx(LR)
    assert all('layer_id' not in group for group in optimizer.param_groups)
    assert len(optimizer.param_groups) == 4  # (x1, x10) x (decayed, not decayed)


@pytest.mark.parametrize('make_model', [vit_model, swin_model], ids=['vit', 'swin'])
def test_weight_decay_spares_norms_biases_and_listed_names(make_model):
    model = make_model()
    groups = group_of(build_optimizer(model, dict(lr=LR, weight_decay=WEIGHT_DECAY), dict(layer_decay_rate=RATE)))
    listed = {'backbone.model.cls_token', 'backbone.model.pos_embed', 'backbone.mask_token'}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        spared = param.ndim <= 1 or name in listed or 'relative_position_bias_table' in name
        assert groups[id(param)]['weight_decay'] == (0.0 if spared else WEIGHT_DECAY), name


def test_sgd_steps_each_layer_by_its_scheduled_learning_rate():
    """Two SGD steps under a warm-up, the group learning rates set as the trainer sets them; each parameter moves
    by the scheduled rate of its layer times its gradient."""
    model = vit_model()
    optimizer = build_optimizer(model, dict(type='SGD', lr=0.1), dict(layer_decay_rate=RATE))
    phases = [dict(type='LinearLR', start_factor=0.25, by_epoch=False, begin=0, end=4)]
    base_lrs = [group['lr'] for group in optimizer.param_groups]
    images = torch.randn(2, 3, 32, 32)
    watched = ['backbone.model.pos_embed', 'backbone.model.blocks.1.mlp.fc1.weight', 'heads.cls.fc.weight']
    params = dict(model.named_parameters())
    for step in range(2):
        for group, base in zip(optimizer.param_groups, base_lrs):
            group['lr'] = scheduled_lr(base, step, phases)
        optimizer.zero_grad()
        loss = model.loss('cls', dict(images=images, targets=torch.tensor([0, 2])))
        sum(loss.values()).backward()
        before = {name: params[name].detach().clone() for name in watched}
        optimizer.step()
        warmup = 0.25 + 0.75 * step / 4
        for name in watched:
            lr = 0.1 * warmup * RATE ** (4 - vit_layer_id(name))
            torch.testing.assert_close(before[name] - params[name].detach(), lr * params[name].grad)


def test_the_groups_are_logged_once_as_a_table(caplog):
    with caplog.at_level(logging.INFO, logger='mtvision'):
        build_optimizer(vit_model(), dict(lr=LR), dict(layer_decay_rate=RATE))
    (record,) = [record for record in caplog.records if 'paramwise_cfg' in record.getMessage()]
    message = record.getMessage()
    assert 'layer_decay_rate 0.5 over 3 blocks' in message and 'backbone.model.patch_embed.proj.weight' in message


@pytest.mark.parametrize('paramwise_cfg, error, match', [
    (dict(layer_decay=0.65), KeyError, 'layer_decay'),
    (dict(layer_decay_rate=0.0), ValueError, 'layer_decay_rate'),
    (dict(layer_decay_rate=1.5), ValueError, 'layer_decay_rate'),
    (dict(layer_decay_rate='0.65'), ValueError, 'layer_decay_rate'),
    (dict(custom_keys={'heads': dict(lr_mul=10.0)}), KeyError, r"custom_keys\['heads'\]"),
    (dict(custom_keys={'heads': dict(lr_mult=-1.0)}), ValueError, r"custom_keys\['heads'\]"),
    (dict(custom_keys={'headz': dict(lr_mult=10.0)}), KeyError, 'headz'),
])
def test_bad_paramwise_cfg_is_named(paramwise_cfg, error, match):
    with pytest.raises(error, match=match):
        build_optimizer(vit_model(), dict(lr=LR), paramwise_cfg)


def test_layer_decay_needs_a_backbone_with_blocks():
    with pytest.raises(TypeError, match='mlp_blocks'):
        build_optimizer(torch.nn.Linear(2, 2), dict(lr=LR), dict(layer_decay_rate=RATE))


def test_config_accepts_paramwise_cfg():
    check_config(dict(optim_wrapper=dict(optimizer=dict(type='AdamW', lr=LR),
                                         paramwise_cfg=dict(layer_decay_rate=0.65))))


def test_the_trainer_builds_its_optimizer_with_the_configs_paramwise_cfg(tiny_config, tmp_path):
    from mtvision.engine import Trainer

    cfg = tiny_config(**{'optim_wrapper.paramwise_cfg': dict(layer_decay_rate=0.5,
                                                             custom_keys={'heads': dict(lr_mult=10.0)}),
                         'optim_wrapper.optimizer.lr': 1e-3})
    trainer = Trainer(cfg, tmp_path, validate=False)
    depth = len(trainer.model.backbone.model.blocks)
    by_name = {id(param): name for name, param in trainer.model.named_parameters()}
    rates = {by_name[id(param)]: group['lr'] for group in trainer.optimizer.param_groups for param in group['params']}
    assert rates['backbone.model.patch_embed.proj.weight'] == pytest.approx(1e-3 * 0.5 ** (depth + 1))
    assert rates['backbone.model.blocks.0.attn.qkv.weight'] == pytest.approx(1e-3 * 0.5 ** depth)
    assert rates['heads.cls.fc.weight'] == pytest.approx(1e-3 * 10)
    assert trainer.base_lrs == [group['lr'] for group in trainer.optimizer.param_groups]
