"""Checkpoints, weights files and their headers come from anyone: opening one through any tool runs none of it.

Each crafted file carries a payload that would create a marker file if it ran: Python in a checkpoint's stored
config, a ``type`` that mmengine's registry would import (a module whose import plants the marker) or call
(``subprocess.getoutput``), in a stored config or a safetensors ``backbone`` header, and a training state whose pickle
calls a function on load. Every entry point that opens such files is driven with each: the marker never appears, and
the tools that read the payload refuse with an error naming the file and the offending name.
"""
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mtvision
from mtvision.engine import Trainer
from mtvision.checkpoint import STATE_FILE, config_to_json, parse_stored_config, read_stored_config, \
    save_checkpoint
from mtvision.probe.models import load_backbone
from mtvision.registry import MODELS, check_stored
from mtvision.zoo import UnsafeCheckpointError

TINY_MODEL = {'model.backbone.embed_dim': 32, 'model.backbone.depth': 2, 'model.backbone.num_heads': 2}
QUICKSTART_NAME = 'vit-tiny-p8_4task_synthetic'


@pytest.fixture(scope='module')
def trained_runs() -> dict:
    return {}


@pytest.fixture
def run(tiny_config, tmp_path_factory, trained_runs):
    """One 1-iteration tiny run for the module (its stored config is mmengine's pretty_text): (work dir, cfg)."""
    if not trained_runs:
        cfg = tiny_config(**{'train_cfg.max_iters': 1})
        work_dir = tmp_path_factory.mktemp('untrusted') / 'run'
        Trainer(cfg, work_dir, validate=False).train()
        trained_runs.update(work_dir=work_dir, cfg=cfg)
    return trained_runs['work_dir'], trained_runs['cfg']


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / 'MARKER'


@pytest.fixture
def planting_module(tmp_path, marker, monkeypatch) -> str:
    """The name of an importable module whose import creates ``marker``."""
    name = f'planting_{tmp_path.name}'.replace('-', '_')
    (tmp_path / f'{name}.py').write_text(f'import pathlib\npathlib.Path({str(marker)!r}).touch()\n\nclass Thing:\n'
                                         f'    pass\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def craft_checkpoint(work_dir: Path, dest: Path, **state_changes) -> Path:
    """A copy of ``work_dir``'s checkpoint under ``dest`` (a work dir) with its training state's entries changed."""
    checkpoint = dest / 'iter_1'
    shutil.copytree(work_dir / 'iter_1', checkpoint)
    (dest / 'last_checkpoint').write_text('iter_1')
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    torch.save({**state, **state_changes}, checkpoint / STATE_FILE)
    return checkpoint


def craft_weights_file(work_dir: Path, path: Path, backbone: dict) -> Path:
    """The checkpoint's weights with ``backbone`` as the header's backbone description."""
    source = work_dir / 'iter_1' / 'model.safetensors'
    with safe_open(source, framework='pt') as f:
        header = dict(f.metadata())
    save_file(load_file(source), path, metadata=dict(header, backbone=json.dumps(backbone)))
    return path


def test_the_payloads_are_live(planting_module, marker):
    # what the tests below guard against: mmengine's registry imports a name it does not know, dotted or not
    with pytest.raises(TypeError):
        MODELS.build(dict(type=planting_module))
    assert marker.exists()


# what each artifact is, what a tool reading it must name in its refusal, and how it is made
def _artifact(kind: str, run, tmp_path: Path, marker: Path, module: str,
              code_running_pickle) -> tuple[Path, list[str]]:
    work_dir, cfg = run
    crafted = tmp_path / 'crafted'
    if kind == 'python-config':
        text = cfg.pretty_text + f"\n_x = __import__('pathlib').Path({str(marker)!r}).touch()\n"
        return craft_checkpoint(work_dir, crafted, config=text), [STATE_FILE, '__import__']
    if kind in ('json-config-module', 'json-config-getoutput'):
        plain = cfg.to_dict()
        bad = f'{module}.Thing' if kind == 'json-config-module' else 'subprocess.getoutput'
        plain['model']['backbone'] = dict(type=bad, cmd=f'touch {marker}')
        return craft_checkpoint(work_dir, crafted, config=json.dumps(plain)), [STATE_FILE, bad]
    if kind in ('header-module', 'header-getoutput'):
        bad = module if kind == 'header-module' else 'subprocess.getoutput'
        path = craft_weights_file(work_dir, tmp_path / 'crafted.safetensors', dict(type=bad, cmd=f'touch {marker}'))
        return path, [str(path.with_suffix('')), bad]
    assert kind == 'unsafe-state'
    return craft_checkpoint(work_dir, crafted, args=code_running_pickle(marker)), [STATE_FILE, 'plant_marker']


def _open(entry: str, path: Path, tmp_path: Path, tiny_data: Path, cfg, load_tool):
    """Open ``path`` as ``entry`` does."""
    if entry == 'knn':
        return load_tool('knn').main([str(path), '--data', str(tiny_data / 'classification')])
    if entry == 'linear_probe':
        return load_tool('linear_probe').main([str(path), '--data', str(tiny_data / 'classification')])
    if entry == 'dense_probe':
        return load_tool('dense_probe').main([str(path), '--task-type', 'segmentation', '--num-classes', '4',
                                              '--data', str(tiny_data / 'segmentation')])
    if entry == 'extract_task_model':
        return load_tool('extract_task_model').main([str(path), '--task', 'seg', '--out', str(tmp_path / 'x')])
    if entry == 'publish_model':
        return load_tool('publish_model').main([str(path), '--name', 'x', '--out', str(tmp_path / 'pub'),
                                                '--config', 'configs/quickstart/x.py'])
    if entry == 'timm_to_mtvision':  # the header as a --backbone-json file named like the weights file
        with safe_open(path, framework='pt') as f:
            path.with_suffix('.json').write_text(f.metadata()['backbone'])
        return load_tool('model_converters/timm_to_mtvision').main(
            ['timm:vit_tiny_patch16_224', str(tmp_path / 'out.safetensors'), '--backbone-json',
             str(path.with_suffix('.json'))])
    if entry == 'get_model':
        return mtvision.get_model(QUICKSTART_NAME, pretrained=path, **TINY_MODEL)
    config = tmp_path / 'tiny.py'
    cfg.dump(str(config))
    option = '--resume' if entry == 'train --resume' else '--load-from'
    return load_tool('train').main([str(config), '--work-dir', str(tmp_path / 'work'), '--no-validate', option,
                                    str(path)])


READERS = ['knn', 'linear_probe', 'dense_probe', 'extract_task_model', 'publish_model']
CHECKPOINTS = ['python-config', 'json-config-module', 'json-config-getoutput', 'unsafe-state']
HEADERS = ['header-module', 'header-getoutput']
# tools that read the stored config, header or training state, and must refuse the payload
REFUSING = [(entry, kind) for entry in READERS for kind in CHECKPOINTS] + \
    [(entry, kind) for entry in READERS[:3] + ['timm_to_mtvision'] for kind in HEADERS] + \
    [('train --resume', 'unsafe-state')]
# these open only the weights (safetensors): the payload is never read, so they load the file
IGNORING = [(entry, kind) for entry in ('train --load-from', 'get_model')
            for kind in ('python-config', 'json-config-module', 'header-module', 'unsafe-state')] + \
    [('train --resume', 'python-config'), ('train --resume', 'json-config-module')]


@pytest.mark.parametrize('entry,kind', REFUSING + IGNORING)
def test_no_entry_point_runs_a_crafted_file(entry, kind, run, tmp_path, tiny_data, marker, planting_module,
                                            load_tool, monkeypatch, code_running_pickle):
    monkeypatch.chdir(tmp_path)  # a relative path in a payload lands here too
    path, named = _artifact(kind, run, tmp_path, marker, planting_module, code_running_pickle)
    if (entry, kind) in IGNORING:
        _open(entry, path, tmp_path, tiny_data, run[1], load_tool)
    else:
        with pytest.raises((ValueError, UnsafeCheckpointError, SystemExit)) as info:
            _open(entry, path, tmp_path, tiny_data, run[1], load_tool)
        error = info.value.__cause__ if isinstance(info.value, SystemExit) else info.value  # train.py logs, exits
        assert isinstance(error, (ValueError, UnsafeCheckpointError))
        message = str(error)
        assert all(name in message for name in named), message
        assert 'weights_only=False' not in message
    assert not marker.exists()
    assert planting_module not in sys.modules


def test_resume_refuses_an_unsafe_training_state_with_mtvisions_message(run, tmp_path, marker, code_running_pickle):
    checkpoint = craft_checkpoint(run[0], tmp_path / 'crafted', args=code_running_pickle(marker))
    with pytest.raises(UnsafeCheckpointError) as info:
        Trainer(run[1], tmp_path / 'work', resume=str(checkpoint), validate=False)
    assert str(checkpoint / STATE_FILE) in str(info.value) and info.value.globals == [code_running_pickle.PLANTED]
    assert info.value.__cause__ is None and not marker.exists()


@pytest.mark.parametrize('form', ['pretty_text', 'json'])
def test_old_and_new_stored_configs_load(form, run, tmp_path, load_tool, capsys):
    work_dir, cfg = run
    text = cfg.pretty_text if form == 'pretty_text' else config_to_json(cfg)
    checkpoint = craft_checkpoint(work_dir, tmp_path / 'ckpt', config=text)
    stored = read_stored_config(checkpoint)
    assert json.loads(config_to_json(stored)) == json.loads(config_to_json(cfg))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = load_backbone(str(work_dir)).backbone(images).tokens
    torch.testing.assert_close(load_backbone(str(checkpoint)).backbone(images).tokens, expected, rtol=0, atol=0)
    result = load_tool('publish_model').main([str(checkpoint), '--name', 'x', '--out', str(tmp_path / 'pub'),
                                              '--config', 'configs/quickstart/x.py'])
    assert result['path'].is_file()


def test_weights_arguments_in_stored_descriptions_are_dropped(run, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # were they not dropped, timm would try to fetch, then fail
    work_dir, cfg = run
    plain = cfg.to_dict()
    plain['model']['backbone'].update(pretrained=True, pretrained_file=str(tmp_path / 'absent.safetensors'))
    checkpoint = craft_checkpoint(work_dir, tmp_path / 'ckpt', config=json.dumps(plain))
    header = dict(plain['model']['backbone'], pretrained_cfg_overlay=dict(url='https://example.com/w.pth'))
    weights = craft_weights_file(work_dir, tmp_path / 'w.safetensors', header)
    with caplog.at_level('INFO', logger='mtvision.registry'):
        for spec in (checkpoint, weights):
            load_backbone(str(spec))
    assert 'pretrained_file' in caplog.text and 'pretrained_cfg_overlay' in caplog.text and 'dropped' in caplog.text


@pytest.mark.parametrize('cfg,bad', [
    (dict(type='os.system'), "'os.system'"),
    (dict(type='mmdet.ViT'), "'mmdet.ViT'"),  # no scope lookup either
    (dict(type='posixpath'), "'posixpath'"),
    (dict(type=['ViT']), "['ViT']"),
    (dict(type='ViT', model_name='hf-hub:someone/model'), "'hf-hub:someone/model'"),
    (dict(type='ViT', model_name='no_such_model'), "'no_such_model'"),
    (dict(type='MultiTaskModel', backbone=dict(type='ViT'),
          heads=dict(cls=dict(type='ClassificationHead', num_classes=2, loss=dict(type='builtins.exec')))),
     "model.heads.cls.loss.type='builtins.exec'"),
])
def test_stored_descriptions_name_only_registered_parts(cfg, bad):
    with pytest.raises(ValueError) as info:
        check_stored(MODELS, cfg, 'some/file.safetensors')
    assert 'some/file.safetensors' in str(info.value) and bad in str(info.value)


def test_a_nested_part_may_come_from_another_mtvision_registry():
    dataset = dict(type='ImageFolderDataset', data_root='x', pipeline=[dict(type='Resize', size=8)])
    from mtvision.registry import DATASETS
    assert check_stored(DATASETS, dataset, 'f') == dataset


@pytest.mark.parametrize('text,offending', [
    ("model = dict(type='ViT')\nimport os\n", 'import os'),
    ("x = __import__('os').system('true')\n", "__import__('os').system('true')"),
    ("x = dict(a=[i for i in range(3)])\n", '[i for i in range(3)]'),
    ("x = f'{1}'\n", "f'{1}'"),
    ("x = open\n", 'open'),
    ("x = dict(**other)\n", 'dict(**other)'),
    ("x, y = 1, 2\n", 'x, y = (1, 2)'),
    ("x = dict(a=().__class__)\n", '().__class__'),
])
def test_python_config_text_is_parsed_as_data_only(text, offending):
    with pytest.raises(ValueError) as info:
        parse_stored_config(text, 'ckpt/training_state.pth')
    assert 'ckpt/training_state.pth' in str(info.value) and f'`{offending}`' in str(info.value)


def test_keys_that_would_be_code_when_written_out_again_are_refused():
    # Config.pretty_text writes non-name keys as '{key}' unescaped: this key would close the quote
    with pytest.raises(ValueError, match='not a plain name'):
        parse_stored_config(json.dumps({'model': {"a': __import__('os'), 'b": 1}}), 'f')
    with pytest.raises(ValueError, match='not a name'):
        parse_stored_config(json.dumps({'x = 1\nimport os\ny': 1}), 'f')
    assert parse_stored_config("x = dict(a=-1, b={'c d': (1.5, None, True)})\n", 'f') == \
        dict(x=dict(a=-1, b={'c d': (1.5, None, True)}))


def test_checkpoint_files_have_the_processes_normal_permissions(tmp_path):
    model = torch.nn.Linear(2, 2)
    previous = os.umask(0o027)
    try:
        checkpoint = save_checkpoint(tmp_path, 1, model, dict(step=1), ema_model=model)
    finally:
        os.umask(previous)
    files = sorted(p for p in tmp_path.rglob('*') if p.is_file())
    assert {p.name for p in files} == {'model.safetensors', 'ema.safetensors', STATE_FILE, 'last_checkpoint'}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(0o640) for p in files}
    assert oct(stat.S_IMODE(checkpoint.stat().st_mode)) == oct(0o750)
