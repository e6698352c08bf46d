"""One resolver: every way of naming weights, through every entry point that takes them, loads the same weights or
fails with the same error."""
import hashlib
import shutil

import pytest
import torch
import yaml

from mtvision.checkpoint import read_weights
from mtvision.engine import Trainer
from mtvision.fileio import save_weights_file
from mtvision.probe.models import load_backbone
from mtvision.zoo import get_model, load_model, resolve, resume_checkpoint

DATASETS = ['cls=tiny-cls', 'det=tiny-det', 'seg=tiny-seg', 'depth=tiny-depth']


@pytest.fixture
def specs(tiny_run, tmp_path, capsys, load_tool, monkeypatch):
    """Every kind of spec for the weights of one 1-iteration run, plus bad ones: ({row: spec}, trained weights,
    the run's config file)."""
    work_dir, cfg = tiny_run
    for variable in ('MTVISION_MIRROR', 'MTVISION_OFFLINE'):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv('MTVISION_HOME', str(tmp_path / 'cache'))
    monkeypatch.setenv('MTVISION_ZOO', str(tmp_path / 'zoo'))
    load_tool('publish_model').main([str(work_dir), '--name', 'my-tiny', '--out', str(tmp_path / 'published'),
                                     '--dataset', *DATASETS, '--register', str(tmp_path / 'zoo')])
    capsys.readouterr()
    published = next((tmp_path / 'published').glob('*.safetensors'))  # its name ends with its hash
    trained = read_weights(work_dir)
    config = tmp_path / 'tiny.py'
    cfg.dump(str(config))
    torch.save({'model': trained, 'epoch': 3}, tmp_path / 'weights.pth')  # as DeiT and MAE save theirs
    timm_file = tmp_path / 'timm_layout.safetensors'
    save_weights_file(timm_file, {key[len('backbone.model.'):]: value for key, value in trained.items()
                                  if key.startswith('backbone.model.')})
    unhashed, mirrored = tmp_path / 'unhashed.safetensors', tmp_path / 'mirror' / published.name
    mirrored.parent.mkdir()
    shutil.copyfile(published, unhashed)
    shutil.copyfile(published, mirrored)  # not the zoo entry's URL: verified by the hash in its name
    (tmp_path / 'not-a-checkpoint').mkdir()
    (tmp_path / 'weights.txt').write_text('0.5')
    good = {
        'work dir': work_dir,
        'checkpoint dir': work_dir / 'iter_1',
        'file in a checkpoint': work_dir / 'iter_1' / 'model.safetensors',
        'safetensors file': published,
        'weights-only .pth': tmp_path / 'weights.pth',
        "timm's layout": timm_file,
        'timm:<name>@<file>': f'timm:vit_tiny_patch16_224@{timm_file}',
        'file:// URL with its hash': mirrored.as_uri(),
        'zoo name': 'my-tiny',
    }
    bad = {
        'missing path': tmp_path / 'missing.safetensors',
        'misspelt zoo name': 'my-tinny',
        'folder without a checkpoint': tmp_path / 'not-a-checkpoint',
        'unsupported suffix': tmp_path / 'weights.txt',
        'URL without a hash': unhashed.as_uri(),
        'timm: without the file': f'timm:vit_tiny_patch16_224@{tmp_path / "gone.safetensors"}',
    }
    return {k: str(v) for k, v in good.items()}, {k: str(v) for k, v in bad.items()}, trained, config, cfg


def backbone_of(weights: dict) -> dict:
    return {key[len('backbone.'):]: value for key, value in weights.items() if key.startswith('backbone.')}


def test_every_spec_loads_the_same_weights_through_every_entry_point(specs, tmp_path):
    good, _, trained, config, cfg = specs
    entry_points = {
        "get_model(name, pretrained=SPEC)": lambda spec: get_model('my-tiny', pretrained=spec).backbone,
        'load_model(SPEC, config=FILE)': lambda spec: load_model(spec, config=config).backbone,
        'Trainer(load_from=SPEC)': lambda spec: Trainer(cfg, tmp_path / 'load_from', load_from=spec,
                                                        validate=False).model.backbone,
        'probe MODEL': lambda spec: load_backbone(spec, config=None if 'timm' not in spec and '.pth' not in spec
                                                  else str(config)).backbone,
    }
    expected = backbone_of(trained)
    for row, spec in good.items():
        for entry_point, load in entry_points.items():
            if row == 'timm:<name>@<file>' and entry_point == 'probe MODEL':
                continue  # a probe builds the named timm architecture itself (tests/probe/test_models.py)
            state = load(spec).state_dict()
            assert set(state) == set(expected), (row, entry_point)
            assert all(torch.equal(state[key], expected[key]) for key in expected), (row, entry_point)


def test_the_whole_model_loads_from_specs_that_hold_it_and_only_those_carry_a_config(specs):
    good, _, trained, config, _ = specs
    good['entry URL'] = resolve('my-tiny').entry.weights
    whole = {'work dir', 'checkpoint dir', 'file in a checkpoint', 'safetensors file', 'weights-only .pth',
             'file:// URL with its hash', 'zoo name'}
    for row in whole:
        state = load_model(good[row], config=config).state_dict()
        assert all(torch.equal(state[key], value) for key, value in trained.items()), row
    # the architecture from the spec itself: what a checkpoint stores, what a zoo entry names (also for its URL)
    for row in ('work dir', 'checkpoint dir', 'zoo name', 'entry URL'):
        model = load_model(good[row])
        assert model.backbone.embed_dim == 32 and set(model.data_config) == set(trained_tasks(trained)), row
    for row in ('safetensors file', 'weights-only .pth', "timm's layout", 'file:// URL with its hash'):
        with pytest.raises(ValueError, match=r'holds weights but no model config: pass config='):
            load_model(good[row])


def trained_tasks(weights: dict) -> set[str]:
    return {key.split('.')[1] for key in weights if key.startswith('heads.')}


def test_only_checkpoints_resume_and_the_error_says_to_load_instead(specs, tmp_path):
    good, _, _, _, cfg = specs
    iteration = resolve(good['checkpoint dir']).path
    for row, spec in good.items():
        if row in ('work dir', 'checkpoint dir', 'file in a checkpoint'):
            assert resume_checkpoint(spec) == iteration, row
        else:
            with pytest.raises(ValueError, match=rf'cannot resume from .*without the training state.*use --load-from '
                                                 rf'{spec}'):
                resume_checkpoint(spec)
    with pytest.raises(ValueError, match='cannot resume from .my-tiny.: it names a model zoo entry'):
        Trainer(cfg, tmp_path / 'resumed', resume=good['zoo name'], validate=False)
    assert Trainer(cfg, tmp_path / 'resumed', resume=good['work dir'], validate=False).step == 1


def test_bad_specs_fail_alike_everywhere(specs, tmp_path):
    _, bad, _, config, cfg = specs
    entry_points = {
        'resolve': resolve,
        'get_model': lambda spec: get_model('my-tiny', pretrained=spec),
        'load_model': lambda spec: load_model(spec, config=config),
        'Trainer(load_from=)': lambda spec: Trainer(cfg, tmp_path / 'bad', load_from=spec, validate=False),
        'Trainer(resume=)': lambda spec: Trainer(cfg, tmp_path / 'bad', resume=spec, validate=False),
        'probe MODEL': load_backbone,
    }
    expected = {
        'missing path': (FileNotFoundError, 'missing.safetensors. is not a file or directory, a URL, timm:'),
        'misspelt zoo name': (FileNotFoundError, r"close zoo names: \['my-tiny'\]"),
        'folder without a checkpoint': (FileNotFoundError, 'is neither a checkpoint directory'),
        'unsupported suffix': (ValueError, r"unsupported weights file suffix '.txt'"),
        'URL without a hash': (ValueError, 'carries no SHA-256 prefix'),
        'timm: without the file': (FileNotFoundError, "no weights file '.*gone.safetensors'"),
    }
    for row, spec in bad.items():
        errors = set()
        for entry_point, load in entry_points.items():
            with pytest.raises(expected[row][0], match=expected[row][1]) as caught:
                load(spec)
            errors.add(str(caught.value))
        assert len(errors) == 1, (row, errors)  # word for word the same message


def test_a_zoo_entrys_own_url_is_verified_by_the_entrys_hash(specs, tmp_path):
    good, _, trained, _, _ = specs
    metafile = yaml.safe_load((tmp_path / 'zoo' / 'metafile.yml').read_text())
    (entry,) = metafile['Models']
    renamed = tmp_path / 'no-hash-in-this-name.safetensors'
    shutil.copyfile(resolve(good['safetensors file']).path, renamed)
    entry['Weights'], entry['SHA256'] = renamed.as_uri(), hashlib.sha256(renamed.read_bytes()).hexdigest()
    (tmp_path / 'zoo' / 'metafile.yml').write_text(yaml.safe_dump(metafile, sort_keys=False))
    resolved = resolve(renamed.as_uri())
    assert resolved.kind == 'url' and resolved.entry.name == 'my-tiny'
    assert all(torch.equal(value, trained[key]) for key, value in resolved.read_weights().items())
