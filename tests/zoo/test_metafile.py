import functools
import hashlib
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mtvision.zoo import ChecksumError
from mtvision.zoo.api import get_model, list_models
from mtvision.zoo.metafile import MetafileError, load_metafile, load_zoo

ROOT = Path(__file__).resolve().parents[2]
URL_DIR = 'https://example.com/mtvision/releases/download/v9'
TINY_CONFIG = """_base_ = ['../quickstart/vit-tiny-p8_4task_synthetic.py']
model = dict(backbone=dict(embed_dim=32, depth=2, num_heads=2))
"""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe(name='tiny_recipe', **overrides):
    entry = {'Name': name, 'In Collection': 'Tiny',
             'Metadata': {'Training Data': 'synthetic', 'Parameters': 10, 'Architecture': ['ViT']},
             'Config': 'configs/tiny/tiny.py'}
    entry.update(overrides)
    return entry


def write_metafile(root: Path, models: list[dict], family='tiny') -> Path:
    path = root / 'configs' / family / 'metafile.yml'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({'Collections': [{'Name': 'Tiny'}], 'Models': models}, sort_keys=False))
    return path


@pytest.fixture
def zoo_root(tmp_path) -> Path:
    """A zoo of the repository's configs (without its metafiles) plus configs/tiny/tiny.py, a tiny quick start."""
    root = tmp_path / 'zoo'
    shutil.copytree(ROOT / 'configs', root / 'configs', ignore=shutil.ignore_patterns('metafile.yml'))
    (root / 'configs' / 'tiny').mkdir()
    (root / 'configs' / 'tiny' / 'tiny.py').write_text(TINY_CONFIG)
    return root


@pytest.fixture
def published(zoo_root, tmp_path):
    """Weights of a tiny model (seed 0) published under URL_DIR: (entry dict, weights file, mirror folder)."""
    torch.manual_seed(0)
    write_metafile(zoo_root, [recipe()])
    model = get_model('tiny_recipe', root=zoo_root)
    staged = tmp_path / 'staged.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, staged, metadata={'format': 'mtvision'})
    sha = sha256_of(staged)
    filename = f'tiny_20260101-{sha[:8]}.safetensors'
    mirror = tmp_path / 'mirror'
    weights = mirror / 'mtvision' / 'releases' / 'download' / 'v9' / filename
    weights.parent.mkdir(parents=True)
    shutil.move(staged, weights)
    entry = recipe('tiny_published', Weights=f'{URL_DIR}/{filename}', SHA256=sha,
                   Results=[{'Task': 'Image Classification', 'Dataset': 'synthetic/cls', 'Metrics': {'top1': 50.0}}])
    write_metafile(zoo_root, [recipe(), entry])
    return entry, weights, mirror


def assert_weights_equal(model, path: Path):
    expected = load_file(path)
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_repository_metafiles_validate():
    zoo = load_zoo()
    quick = zoo.models_in('Quick start')
    assert {e.name for e in quick} >= {'vit-tiny-p8_4task_synthetic', 'swin-tiny-w4_4task_synthetic',
                                       'vit-tiny-p8-moe-e8_4task_synthetic', 'vit-tiny-p8_4task_600it_synthetic'}
    upstream = [entry for entry in zoo.models.values() if entry.weights_format == 'timm']
    assert {e.name for e in upstream} >= {'vit-b-p16_mae-in1k-upstream_4task', 'swin-t-w7_in1k-upstream_4task'}
    for entry in zoo.models.values():
        assert entry.config_path.is_file()
        if entry.is_recipe:
            assert entry.results == [] and entry.sha256 is None
        elif entry.weights_format == 'timm':  # public upstream weights: where they are, where they came from
            assert entry.weights.startswith('hf://timm/') and entry.results == []
            assert set(entry.converted_from) == {'Weights', 'Code'}
        else:
            # the published file name carries the first 8 digits of the full hash
            assert entry.weights.endswith(f'-{entry.sha256[:8]}.safetensors')
            assert entry.weights.startswith('https://github.com/mtvision/mtvision/releases/download/v0.1.0/')
    assert list_models('*moe*') == ['vit-tiny-p8-moe-e8_4task_synthetic']
    assert list_models('vit-tiny-p8_4task*', pretrained=True) == ['vit-tiny-p8_4task_600it_synthetic']


def test_model_zoo_md_is_in_sync(tmp_path, capsys, load_tool):
    tool = load_tool('gen_model_zoo')
    assert tool.main(['--check']) == 0
    stale = tmp_path / 'model_zoo.md'
    stale.write_text((ROOT / 'model_zoo.md').read_text().replace('| recipe |', '| weights? |', 1))
    assert tool.main(['--check', '--out', str(stale)]) == 1
    assert '\n-| `vit-tiny-p8_4task_synthetic` |' in capsys.readouterr().out  # the diff shows the stale row


def test_generated_table_from_a_metafile(published, zoo_root, load_tool):
    entry, _, _ = published
    tool = load_tool('gen_model_zoo')
    assert tool.main(['--root', str(zoo_root)]) == 0
    text = (zoo_root / 'model_zoo.md').read_text()
    rows = {line.split(' | ')[0]: line for line in text.splitlines() if line.startswith('| `')}
    assert rows['| `tiny_recipe`'].endswith('| recipe |')
    assert ' | 50 | ' in rows['| `tiny_published`'] and entry['Weights'] in rows['| `tiny_published`']
    assert '| Name | Params (M) | synthetic/cls top1 | Config | Weights |' in text
    assert tool.main(['--root', str(zoo_root), '--check']) == 0


@pytest.mark.parametrize('change, message', [
    (dict(Results=[{'Task': 'T', 'Dataset': 'D', 'Metrics': {'top1': 1.0}}]), "cannot have ['Results']"),
    (dict(SHA256='0' * 64), "cannot have ['SHA256']"),
    (dict(Weigths='x'), "unknown key(s) ['Weigths']"),
    (dict(Name='vit.tiny'), 'Name may hold only'),
    (dict(Config='configs/tiny/missing.py'), "Config 'configs/tiny/missing.py' is not a config file"),
    (dict(Metadata={'Training Data': 'x', 'Architecture': ['ViT']}), "missing required key(s) ['Parameters']"),
    (dict(Metadata={'Training Data': 'x', 'Architecture': 'ViT', 'Parameters': '10M'}),
     "Metadata.Parameters must be a positive integer, got '10M'"),
    ({'In Collection': 'Other'}, "In Collection 'Other' is not a collection of this file"),
    (dict(Weights='https://x/m_20260101-0123abcd.safetensors', SHA256='0123abce' + '0' * 56),
     "carries hash '0123abcd', but SHA256 is '0123abce"),
    (dict(Weights='https://x/m.safetensors', SHA256='0123ABCD' * 8), 'SHA256 must be the 64-digit lower-case hex'),
    (dict(Weights='s3://bucket/m.safetensors', SHA256='0' * 64), "Weights 's3://bucket/m.safetensors' must be a URL"),
    (dict(Weights='https://x/m.safetensors', SHA256='0' * 64,
          Results=[{'Task': 'T', 'Dataset': 'D', 'Metrics': {'top1': None}}]),
     'Metrics.top1 must be a finite number, got None'),
    (dict(Weights='https://x/m.safetensors'), 'SHA256 must be the 64-digit'),  # only upstream hashes are optional
    ({'Weights Format': 'timm'}, "cannot have ['Weights Format']"),
    ({'Weights': 'hf://timm/m/model.safetensors', 'Weights Format': 'onnx'}, 'Weights Format must be one of'),
    ({'Weights': 'hf://timm/m/model.safetensors', 'Weights Format': 'timm',
      'Results': [{'Task': 'T', 'Dataset': 'D', 'Metrics': {'top1': 1.0}}]}, 'upstream backbone weights'),
    ({'Weights': 'hf://timm/m/model.safetensors', 'Weights Format': 'timm', 'Converted From': {'Paper': 'x'}},
     'Converted From must be a mapping of Weights and/or Code to URLs'),
])
def test_invalid_entries_name_file_model_and_key(zoo_root, change, message):
    path = write_metafile(zoo_root, [recipe('bad_model', **change)])
    with pytest.raises(MetafileError) as error:
        load_metafile(path, zoo_root)
    assert message in str(error.value)
    assert str(path) in str(error.value)
    assert "'bad_model'" in str(error.value) or "'vit.tiny'" in str(error.value)


def test_a_name_defined_in_two_metafiles_is_an_error(zoo_root):
    first = write_metafile(zoo_root, [recipe('same')], 'tiny')
    second = write_metafile(zoo_root, [recipe('same')], 'tiny2')
    second.write_text(second.read_text().replace('Name: Tiny', 'Name: Tiny2').replace('In Collection: Tiny',
                                                                                          'In Collection: Tiny2'))
    with pytest.raises(MetafileError, match=f"model 'same' is already defined in {first}"):
        load_zoo(zoo_root)


def test_get_model_through_a_file_mirror(published, zoo_root, tmp_path, monkeypatch):
    entry, weights, mirror = published
    monkeypatch.setenv('MTVISION_MIRROR', mirror.as_uri())
    monkeypatch.setenv('MTVISION_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('MTVISION_OFFLINE', raising=False)
    assert list_models(root=zoo_root) == ['tiny_published', 'tiny_recipe']
    assert list_models('tiny_*', pretrained=True, root=zoo_root) == ['tiny_published']

    torch.manual_seed(1)  # another initialisation: equality below can only come from the loaded file
    fresh = get_model('tiny_recipe', root=zoo_root)
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in load_file(weights).items())
    torch.manual_seed(1)
    model = get_model('tiny_published', pretrained=True, root=zoo_root)
    assert_weights_equal(model, weights)
    assert sha256_of(tmp_path / 'cache' / 'checkpoints' / weights.name) == entry['SHA256']

    # offline, the verified cached copy serves the same weights
    monkeypatch.setenv('MTVISION_OFFLINE', '1')
    monkeypatch.setenv('MTVISION_MIRROR', (tmp_path / 'nowhere').as_uri())
    assert_weights_equal(get_model('tiny_published', pretrained=True, root=zoo_root), weights)


def test_get_model_through_an_http_mirror(published, zoo_root, tmp_path, monkeypatch):
    _, weights, mirror = published
    paths = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            paths.append(self.path)

    server = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(mirror)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv('MTVISION_MIRROR', f'http://127.0.0.1:{server.server_address[1]}')
        monkeypatch.setenv('MTVISION_HOME', str(tmp_path / 'cache'))
        monkeypatch.delenv('MTVISION_OFFLINE', raising=False)
        model = get_model('tiny_published', pretrained=True, root=zoo_root)
    finally:
        server.shutdown()
        server.server_close()
    assert_weights_equal(model, weights)
    assert paths == [f'/mtvision/releases/download/v9/{weights.name}']  # mirror base + the URL's path


def test_a_wrong_hash_in_the_metafile_is_refused(published, zoo_root, tmp_path, monkeypatch):
    entry, weights, mirror = published
    wrong = entry['SHA256'][:8] + ('0' if entry['SHA256'][8] != '0' else '1') + entry['SHA256'][9:]
    write_metafile(zoo_root, [dict(entry, SHA256=wrong)])
    monkeypatch.setenv('MTVISION_MIRROR', mirror.as_uri())
    monkeypatch.setenv('MTVISION_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('MTVISION_OFFLINE', raising=False)
    with pytest.raises(ChecksumError, match=f'expected {wrong}, got {entry["SHA256"]}'):
        get_model('tiny_published', pretrained=True, root=zoo_root)
    assert not (tmp_path / 'cache' / 'checkpoints' / weights.name).exists()


def test_pretrained_path_url_and_errors(published, zoo_root, tmp_path, monkeypatch):
    entry, weights, mirror = published
    monkeypatch.setenv('MTVISION_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('MTVISION_MIRROR', raising=False)
    monkeypatch.delenv('MTVISION_OFFLINE', raising=False)
    assert_weights_equal(get_model('tiny_recipe', pretrained=weights, root=zoo_root), weights)
    # a URL other than the entry's is verified by the hash in its file name
    assert_weights_equal(get_model('tiny_recipe', pretrained=weights.as_uri(), root=zoo_root), weights)
    unhashed = tmp_path / 'plain.safetensors'
    shutil.copyfile(weights, unhashed)
    with pytest.raises(ValueError, match='carries no SHA-256 prefix'):
        get_model('tiny_recipe', pretrained=unhashed.as_uri(), root=zoo_root)
    with pytest.raises(ValueError, match="'tiny_recipe' is a recipe without published weights"):
        get_model('tiny_recipe', pretrained=True, root=zoo_root)
    with pytest.raises(KeyError, match=r"no model named 'tiny_publishd'.*did you mean \['tiny_published'"):
        get_model('tiny_publishd', root=zoo_root)
    with pytest.raises(FileNotFoundError, match='missing.safetensors. is not a file or directory, a URL'):
        get_model('tiny_recipe', pretrained=str(tmp_path / 'missing.safetensors'), root=zoo_root)
    # cfg_options reach the config: a wider model no longer fits the published weights
    with pytest.raises(RuntimeError, match='does not match the model'):
        get_model('tiny_recipe', pretrained=weights, root=zoo_root, **{'model.backbone.embed_dim': 64})


def parameter_parts(entry) -> dict[str, int] | None:
    """The split of an entry's count written as a comment on its Parameters line (``# backbone 85798656, cls 769000``):
    parts of the model (``backbone``, ``momentum_backbones``) and task names (their heads), or None where none is
    written."""
    lines = entry.source.read_text().splitlines()
    start = lines.index(f'  - Name: {entry.name}')
    line = next(line for line in lines[start + 1:] if line.strip().startswith('Parameters:'))
    if '#' not in line:
        return None
    parts = [part.split() for part in line.split('#', 1)[1].split(',')]
    assert all(len(part) == 2 and part[1].isdigit() for part in parts), (entry.name, line)
    return {name: int(count) for name, count in parts}


def test_every_entrys_parameter_count_matches_its_config():
    from mtvision.config import load_config
    from mtvision.registry import MODELS

    split_entries = 0
    for entry in load_zoo().models.values():
        cfg = load_config(str(entry.config_path))
        with torch.device('meta'):  # shapes only: counting needs no memory or initialisation
            model = MODELS.build(dict(cfg.to_dict()['model'], heads={n: t['head'] for n, t in cfg.tasks.items()}))
        assert sum(p.numel() for p in model.parameters()) == entry.parameters, entry.name
        parts = parameter_parts(entry)
        if parts is None:
            continue
        split_entries += 1
        modules = {**dict(model.heads.items()), **{name: module for name, module in model.named_children()
                                                  if name != 'heads'}}
        built = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
        assert parts == {name: count for name, count in built.items() if count}, entry.name
    assert split_entries >= 9  # every entry of configs/real/metafile.yml gives its split


@pytest.fixture
def upstream(zoo_root, tmp_path):
    """A timm ViT's weights in timm's layout at another image size (32 px, the tiny config's is 64 px), listed as an
    upstream backbone entry: (entry dict, weights file, mirror folder)."""
    import timm

    torch.manual_seed(3)
    source = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                               num_classes=7)  # a classifier the backbone does not hold
    staged = tmp_path / 'staged.safetensors'
    save_file(source.state_dict(), staged)
    filename = f'tiny-timm-{sha256_of(staged)[:8]}.safetensors'
    mirror = tmp_path / 'mirror'
    weights = mirror / 'upstream' / filename
    weights.parent.mkdir(parents=True)
    shutil.move(staged, weights)
    entry = recipe('tiny_upstream', Weights=f'https://example.com/upstream/{filename}', SHA256=sha256_of(weights),
                   **{'Weights Format': 'timm', 'Converted From': {'Code': 'https://example.com/code'}})
    write_metafile(zoo_root, [recipe(), entry])
    return entry, weights, mirror


def test_an_upstream_entry_loads_its_backbone_as_timm_does_and_leaves_the_heads(upstream, zoo_root, tmp_path,
                                                                                 monkeypatch):
    import timm

    entry, weights, mirror = upstream
    monkeypatch.setenv('MTVISION_MIRROR', mirror.as_uri())
    monkeypatch.setenv('MTVISION_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('MTVISION_OFFLINE', raising=False)
    torch.manual_seed(0)
    model = get_model('tiny_upstream', pretrained=True, root=zoo_root)
    torch.manual_seed(0)
    initial = get_model('tiny_recipe', root=zoo_root)
    # the reference: timm loading the same file into the backbone's architecture (position embedding resampled)
    reference = timm.create_model('vit_tiny_patch16_224', img_size=64, patch_size=8, embed_dim=32, depth=2,
                                  num_heads=2, num_classes=0, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(weights)))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.backbone.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(model.backbone.model.pos_embed, initial.backbone.model.pos_embed)
    for key, value in initial.heads.state_dict().items():
        assert torch.equal(model.heads.state_dict()[key], value), key

    # no recorded hash: pretrained=True is refused; the file itself, fetched and checked by the user, is taken
    write_metafile(zoo_root, [recipe(), {k: v for k, v in entry.items() if k != 'SHA256'}])
    with pytest.raises(ValueError, match=r"'tiny_upstream': no SHA-256 is recorded for its upstream weights"):
        get_model('tiny_upstream', pretrained=True, root=zoo_root)
    from_path = get_model('tiny_upstream', pretrained=weights, root=zoo_root)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(from_path.backbone.state_dict()[key], value), key
