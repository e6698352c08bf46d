import hashlib
import json
import re

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from mtvision.models import build_model
from mtvision.tasks import build_tasks
from mtvision.zoo.metafile import load_metafile

CONFIG = 'configs/quickstart/vit-tiny-p8_4task_synthetic.py'
DATASETS = ['cls=tiny-cls', 'det=tiny-det', 'seg=tiny-seg', 'depth=tiny-depth']


def publish(tool, tmp_path, capsys, source, *extra):
    out = tool.main([str(source), '--name', 'tiny_1it_synthetic', '--out', str(tmp_path / 'out'),
                     '--date', '20260102', '--config', CONFIG, '--dataset', *DATASETS, *extra])
    captured = capsys.readouterr()
    return out, captured.out, captured.err


def test_publish_round_trip(tiny_run, tmp_path, capsys, load_tool):
    work_dir, cfg = tiny_run
    tool = load_tool('publish_model')
    result, printed, _ = publish(tool, tmp_path, capsys, work_dir, '--mirror', str(tmp_path / 'mirror'),
                                 '--url-base', 'https://example.com/rel/v1')
    path = result['path']
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    match = re.fullmatch(r'tiny_1it_synthetic_20260102-([0-9a-f]{8})\.safetensors', path.name)
    assert match and match.group(1) == sha[:8]

    # weights only: exactly the checkpoint's tensors, bit for bit, and a header with no training state
    checkpoint = work_dir / 'iter_1' / 'model.safetensors'
    published, trained = load_file(path), load_file(checkpoint)
    assert set(published) == set(trained)
    assert all(torch.equal(published[k], trained[k]) for k in trained)
    with safe_open(path, framework='pt') as f, safe_open(checkpoint, framework='pt') as g:
        header, original = f.metadata(), g.metadata()
    assert header == {'format': 'mtvision', 'name': 'tiny_1it_synthetic', 'backbone': original['backbone'],
                      'step': '1'}

    # the printed entry is YAML a metafile accepts, with the run's measured numbers and the file's hash
    (entry,) = yaml.safe_load(printed)
    assert entry['SHA256'] == sha and entry['Weights'] == f'https://example.com/rel/v1/{path.name}'
    assert entry['Config'] == CONFIG and entry['Metadata']['Iterations'] == 1
    model = build_model(cfg, build_tasks(cfg.tasks, train=False, val=False))
    assert entry['Metadata']['Parameters'] == sum(p.numel() for p in model.parameters())
    measured = json.loads((work_dir / 'metrics.json').read_text())
    assert measured['step'] == 1
    expected = {}
    for task, metrics in measured['metrics'].items():
        kept = {}
        for key, value in metrics.items():
            if value is not None:
                kept[key] = round(value, 4)
        expected[f'tiny-{task}'] = kept
    assert {r['Dataset']: r['Metrics'] for r in entry['Results']} == expected
    assert [r['Task'] for r in entry['Results']][:1] == ['Image Classification']
    assert any(value is None for m in measured['metrics'].values() for value in m.values())  # dropped above

    metafile = tmp_path / 'zoo' / 'configs' / 'tiny' / 'metafile.yml'
    metafile.parent.mkdir(parents=True)
    metafile.write_text(yaml.safe_dump({'Collections': [{'Name': 'Quick start'}]}) + 'Models:\n' + printed)
    (tmp_path / 'zoo' / 'configs' / 'quickstart').mkdir()
    (tmp_path / 'zoo' / CONFIG).write_text('')
    _, (loaded,) = load_metafile(metafile, tmp_path / 'zoo')
    assert loaded.sha256 == sha and loaded.results == entry['Results']

    # the mirror copy sits at mirror base + URL path
    assert (tmp_path / 'mirror' / 'rel' / 'v1' / path.name).read_bytes() == path.read_bytes()

    # publishing again gives the same bytes (safetensors' header order is fixed); metrics measured at another
    # iteration are not this file's, so that entry gets no Results
    first_bytes = path.read_bytes()
    path.unlink()
    (work_dir / 'metrics.json').write_text(json.dumps(dict(measured, step=0)))
    second, printed, notes = publish(tool, tmp_path, capsys, work_dir / 'iter_1')
    assert second['path'] == path and path.read_bytes() == first_bytes
    assert 'Results' not in yaml.safe_load(printed)[0]
    assert 'holds the metrics of iteration 0, not of the published iteration 1' in notes

    # a run started outside configs/ cannot name its Config by itself
    with pytest.raises(SystemExit, match="cannot tell the run's config"):
        load_tool('publish_model').main([str(work_dir), '--name', 'tiny', '--out', str(tmp_path / 'out')])


def test_bad_arguments_are_named(tmp_path, load_tool):
    work_dir = tmp_path / 'never-read'
    tool = load_tool('publish_model')
    with pytest.raises(SystemExit, match=r"--name 'tiny\.v2'"):
        tool.main([str(work_dir), '--name', 'tiny.v2'])
    with pytest.raises(SystemExit, match="--date '2026-01-02'"):
        tool.main([str(work_dir), '--name', 'tiny', '--date', '2026-01-02'])
    with pytest.raises(SystemExit, match="--dataset 'cls': expected TASK=NAME"):
        tool.main([str(work_dir), '--name', 'tiny', '--dataset', 'cls'])


def test_registered_run_loads_by_name(tiny_run, tmp_path, capsys, load_tool, monkeypatch):
    """A user's own run, published into a user zoo outside the repository, found by name through MTVISION_ZOO and
    loaded from its file:// URL, verified, with nothing tracked edited."""
    from mtvision.zoo import ChecksumError, MetafileError, get_model, list_models

    work_dir, _ = tiny_run
    zoo = tmp_path / 'my-zoo'  # not created yet: --register creates it
    for variable in ('MTVISION_MIRROR', 'MTVISION_OFFLINE'):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv('MTVISION_HOME', str(tmp_path / 'cache'))
    monkeypatch.setenv('MTVISION_ZOO', str(zoo))
    tool = load_tool('publish_model')

    def register(*extra):
        result = tool.main([str(work_dir), '--name', 'my-tiny_1it', '--out', str(tmp_path / 'out'),
                            '--dataset', *DATASETS, '--register', str(zoo), *extra])
        return result, yaml.safe_load(capsys.readouterr().out)[0]

    result, printed = register('--date', '20260102')
    path = result['path']
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    (entry,) = yaml.safe_load((zoo / 'metafile.yml').read_text())['Models']
    assert entry == printed
    assert entry['Weights'] == path.resolve().as_uri() and entry['SHA256'] == sha
    assert entry['In Collection'] == 'Registered runs' and entry['Config'] == f'{path.stem}.json'
    assert [r['Dataset'] for r in entry['Results']][:1] == ['tiny-cls']

    # the stored config is the run's own (a 32-wide, 2-block ViT), not the repository's quick start it came from
    assert list_models('my-tiny*', pretrained=True) == ['my-tiny_1it']
    model = get_model('my-tiny_1it', pretrained=True)
    assert model.backbone.embed_dim == 32 and len(model.backbone.model.blocks) == 2
    trained = load_file(work_dir / 'iter_1' / 'model.safetensors')
    state = model.state_dict()
    assert set(state) == set(trained) and all(torch.equal(state[k], trained[k]) for k in trained)
    cached = tmp_path / 'cache' / 'checkpoints' / path.name
    assert cached.read_bytes() == path.read_bytes()

    # a published file changed after registration is refused, not loaded
    tampered = bytearray(path.read_bytes())
    tampered[-1] ^= 1
    path.write_bytes(bytes(tampered))
    with pytest.raises(ChecksumError, match=sha):
        get_model('my-tiny_1it', pretrained=True, cache_dir=tmp_path / 'fresh-cache')

    # registering the name again replaces its entry, and the config file written for the old one goes
    result, _ = register('--date', '20260103')
    (entry,) = yaml.safe_load((zoo / 'metafile.yml').read_text())['Models']
    assert entry['Weights'] == result['path'].resolve().as_uri()
    assert sorted(p.name for p in zoo.iterdir()) == sorted(['metafile.yml', f'{result["path"].stem}.json'])

    # names the repository's zoo defines are refused before anything is written
    metafile_before, published_before = (zoo / 'metafile.yml').read_text(), sorted((tmp_path / 'out').iterdir())
    with pytest.raises(SystemExit, match=r"model 'vit-tiny-p8_4task_synthetic' is already defined in .*quickstart"):
        tool.main([str(work_dir), '--name', 'vit-tiny-p8_4task_synthetic', '--register', str(zoo),
                   '--out', str(tmp_path / 'out'), '--dataset', *DATASETS])
    with pytest.raises(SystemExit, match="collection 'Quick start' is already defined"):
        register('--collection', 'Quick start')
    with pytest.raises(SystemExit, match='--config names a config of the repository'):
        register('--config', CONFIG)
    assert (zoo / 'metafile.yml').read_text() == metafile_before
    assert sorted((tmp_path / 'out').iterdir()) == published_before

    # the user zoo is there only through MTVISION_ZOO, and a folder it names must exist
    monkeypatch.delenv('MTVISION_ZOO')
    with pytest.raises(KeyError, match="no model named 'my-tiny_1it'"):
        get_model('my-tiny_1it')
    monkeypatch.setenv('MTVISION_ZOO', str(tmp_path / 'missing'))
    with pytest.raises(MetafileError, match=r"MTVISION_ZOO=.*not a folder: \[.*missing'\]"):
        list_models()


def test_the_probes_take_a_zoo_name_as_model(tiny_run, tmp_path, capsys, load_tool, monkeypatch):
    """A probe's MODEL may be a zoo name: the same verified weights get_model loads, and the entry's normalisation."""
    from mtvision.checkpoint import read_weights
    from mtvision.probe.models import load_backbone

    work_dir, cfg = tiny_run
    for variable in ('MTVISION_MIRROR', 'MTVISION_OFFLINE'):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv('MTVISION_HOME', str(tmp_path / 'cache'))
    monkeypatch.setenv('MTVISION_ZOO', str(tmp_path / 'my-zoo'))
    load_tool('publish_model').main([str(work_dir), '--name', 'my-tiny_1it', '--out', str(tmp_path / 'out'),
                                     '--dataset', *DATASETS, '--register', str(tmp_path / 'my-zoo')])
    capsys.readouterr()
    loaded = load_backbone('my-tiny_1it')
    trained = {key[len('backbone.'):]: value for key, value in read_weights(work_dir).items()
               if key.startswith('backbone.')}
    assert loaded.backbone.state_dict().keys() == trained.keys()
    assert all(torch.equal(loaded.backbone.state_dict()[key], value) for key, value in trained.items())
    normalize = next(step for step in cfg.tasks['cls']['val_dataset']['pipeline'] if step['type'] == 'Normalize')
    assert (loaded.mean, loaded.std) == (tuple(normalize['mean']), tuple(normalize['std']))
    with pytest.raises(FileNotFoundError, match="'no-such-model' is not a file or directory.*nor a model zoo name"):
        load_backbone('no-such-model')
