import hashlib
import json
import re

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from mtvision.engine import Trainer, build_model
from mtvision.tasks import build_tasks
from mtvision.zoo.metafile import load_metafile

CONFIG = 'configs/quickstart/vit-tiny-p8_4task_synthetic.py'
DATASETS = ['cls=tiny-cls', 'det=tiny-det', 'seg=tiny-seg', 'depth=tiny-depth']


@pytest.fixture
def tiny_run(tiny_config, tmp_path):
    """A 1-iteration quick start on the tiny data, evaluated at its end: (work dir, config)."""
    torch.manual_seed(0)
    cfg = tiny_config(**{'train_cfg.max_iters': 1, 'train_cfg.val_interval': 1, 'train_cfg.val_at_start': False,
                         'checkpoint_cfg.interval': 1})
    Trainer(cfg, tmp_path / 'run').train()
    return tmp_path / 'run', cfg


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
