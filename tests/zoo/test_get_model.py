"""``get_model`` as timm and mmpretrain users call it: nested overrides, and the model's config and data config."""
import pytest

import mtvision
from mtvision.config import load_config
from mtvision.zoo.api import data_config, dotted_overrides

NAME = 'vit-tiny-p8_4task_600it_synthetic'


def test_nested_overrides_merge_into_the_model_config_and_the_model_keeps_its_config():
    model = mtvision.get_model(NAME, backbone=dict(drop_path_rate=0.1, depth=2))
    assert len(model.backbone.model.blocks) == 2
    assert model.backbone.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    # merged, not replaced: the rest of the backbone config is the entry's
    entry_cfg = load_config(str(mtvision.zoo.load_zoo().models[NAME].config_path))
    assert model.cfg.model.backbone.embed_dim == entry_cfg.model.backbone.embed_dim
    assert model.cfg.model.backbone.drop_path_rate == 0.1


def test_dotted_and_nested_overrides_are_the_same_cfg_options():
    assert dotted_overrides({'backbone': dict(moe=dict(num_experts=4)), 'model.neck': None, 'heads': {}}) == {
        'model.backbone.moe.num_experts': 4, 'model.neck': None, 'model.heads': {}}


def test_the_data_config_is_what_the_validation_pipeline_does():
    model = mtvision.get_model(NAME)
    entry_cfg = load_config(str(mtvision.zoo.load_zoo().models[NAME].config_path)).to_dict()
    for task, task_cfg in entry_cfg['tasks'].items():
        steps = {step['type']: step for step in task_cfg['val_dataset']['pipeline']}
        expected_size = steps['Resize']['size'] if 'Resize' in steps else None
        assert model.data_config[task]['mean'] == tuple(steps['Normalize']['mean'])
        assert model.data_config[task]['std'] == tuple(steps['Normalize']['std'])
        assert model.data_config[task]['input_size'] == (None if expected_size is None else (3, *expected_size))
    assert model.data_config['cls']['classes'] == entry_cfg['tasks']['cls']['val_dataset']['classes']


def test_timm_style_eval_settings_and_0_255_statistics_are_read():
    config = data_config(dict(val_dataset=dict(pipeline=[
        dict(type='ResizeCenterCrop', size=224, crop_pct=0.9), dict(type='ToFloat'),
        dict(type='Normalize', mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5])])))
    assert config == dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(3, 224, 224),
                          interpolation='bicubic', crop_pct=0.9, classes=None)
