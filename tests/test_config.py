from pathlib import Path

import pytest

from mtvision.config import ConfigError, check_config, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config_files(tmp_path):
    (tmp_path / 'base.py').write_text(
        "_size = 64\n"
        "train_cfg = dict(max_iters=100, val_interval=50)\n"
        "tasks = dict(cls=dict(type='classification', head=dict(type='ClassificationHead', num_classes=3),\n"
        "                      train_dataset=dict(type='ImageFolderDataset', data_root='x'), batch_size=8))\n")
    (tmp_path / 'child.py').write_text("_base_ = ['./base.py']\ntrain_cfg = dict(max_iters=200)\n")
    return tmp_path


def test_base_inheritance_merges_dicts(config_files):
    cfg = load_config(str(config_files / 'child.py'))
    assert cfg.train_cfg.max_iters == 200 and cfg.train_cfg.val_interval == 50


def test_cfg_options_from_the_command_line_override(config_files, load_tool):
    args = load_tool('train').parse_args([str(config_files / 'child.py'), '--cfg-options', 'train_cfg.max_iters=7',
                                          'tasks.cls.batch_size=2', 'randomness.seed=5'])
    cfg = load_config(args.config, args.cfg_options)
    assert cfg.train_cfg.max_iters == 7 and cfg.tasks.cls.batch_size == 2 and cfg.randomness.seed == 5
    assert cfg.train_cfg.val_interval == 50


@pytest.mark.parametrize('options, key', [
    ({'train_cfg.max_iter': 3}, "train_cfg.'max_iter'"),
    ({'tasks.cls.batchsize': 3}, "tasks.cls.'batchsize'"),
    ({'optimiser': {}}, "'optimiser'"),
])
def test_unknown_keys_are_errors_naming_the_key(config_files, options, key):
    with pytest.raises(ConfigError) as error:
        load_config(str(config_files / 'child.py'), options)
    assert key in str(error.value)


def test_private_variables_and_missing_task_fields():
    check_config({'_anything': 1})
    with pytest.raises(ConfigError, match="tasks.cls needs 'batch_size'"):
        check_config({'tasks': {'cls': {'type': 'classification', 'head': {}, 'train_dataset': {}}}})


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / 'README.md').read_text()
    ci = (ROOT / '.ci' / 'run').read_text()
    test_command = next(line.strip() for line in ci.splitlines() if 'pytest' in line)
    assert test_command in readme


SHIPPED_CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py') if '_base_' not in p.parts)


@pytest.mark.parametrize('path', SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / 'configs')))
def test_every_shipped_recipe_passes_the_checks_and_builds_its_model(path):
    import torch

    from mtvision.data.transforms import build_pipeline
    from mtvision.registry import MODELS
    from mtvision.tasks import TASK_TYPES

    cfg = load_config(str(path))
    assert cfg.tasks and all(task['type'] in TASK_TYPES for task in cfg.tasks.values())
    for part in [*cfg.tasks.values(), *cfg.get('task_groups', {}).values()]:
        for split in ('train_dataset', 'val_dataset'):
            if split in part and 'pipeline' in part[split]:
                build_pipeline(part[split]['pipeline'])  # unknown transforms or arguments fail here
    with torch.device('meta'):  # shapes only: ViT-B recipes build in no time and no memory
        model = MODELS.build(dict(cfg.to_dict()['model'], heads={n: t['head'] for n, t in cfg.tasks.items()}))
    assert set(model.heads) == set(cfg.tasks)


@pytest.mark.parametrize('options, message', [
    ({'tasks.cls.batch_size': '16'}, "tasks.cls.batch_size must be an int, got '16' (str)"),
    ({'tasks.cls.batch_size': True}, 'tasks.cls.batch_size must be an int, got True (bool)'),
    ({'tasks.cls.val_batch_size': 0}, 'tasks.cls.val_batch_size must be at least 1, got 0'),
    ({'tasks.cls.num_workers': 2.0}, 'tasks.cls.num_workers must be an int, got 2.0 (float)'),
    ({'tasks.cls.loss_weight': '1'}, "tasks.cls.loss_weight must be a number, got '1' (str)"),
    ({'train_cfg.max_iters': 1.5}, 'train_cfg.max_iters must be an int, got 1.5'),
    ({'train_cfg.accumulate_steps': 0}, 'train_cfg.accumulate_steps must be at least 1, got 0'),
    ({'train_cfg.val_at_start': 'False'}, "train_cfg.val_at_start must be a bool (True or False), got 'False'"),
    ({'checkpoint_cfg.max_keep': -1}, 'checkpoint_cfg.max_keep must be at least 0, got -1'),
    ({'log_cfg.tensorboard': 1}, 'log_cfg.tensorboard must be a bool (True or False), got 1 (int)'),
    ({'optim_wrapper.clip_grad.max_norm': '1.0'}, "optim_wrapper.clip_grad.max_norm must be a number, got '1.0'"),
    ({'randomness.seed': -3}, 'randomness.seed must be at least 0, got -3'),
    ({'env_cfg.num_threads': '4'}, "env_cfg.num_threads must be an int or None, got '4' (str)"),
])
def test_settings_of_the_wrong_type_or_range_are_errors_naming_the_key(config_files, options, message):
    with pytest.raises(ConfigError) as error:
        load_config(str(config_files / 'child.py'), options)
    assert message in str(error.value)


def test_optional_settings_accept_none_and_numbers_accept_ints(config_files):
    cfg = load_config(str(config_files / 'child.py'), {'checkpoint_cfg.max_keep': None, 'env_cfg.num_threads': None,
                                                       'tasks.cls.loss_weight': 2, 'optim_wrapper.clip_grad': None})
    assert cfg.tasks.cls.loss_weight == 2 and cfg.checkpoint_cfg.max_keep is None
