"""Run folders (a new run never writes into another's logs, a resumed run continues its own), env.json, the optional
trackers (fake ``wandb`` and ``mlflow`` modules that record their calls) and the end of a run on the screen."""
import datetime
import functools
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from mtvision.engine import trainer as trainer_module
from mtvision.engine.logging import (ScalarWriter, collect_env, git_state, latest_run_dir, new_run_dir, run_dirs,
                                     write_json)
from mtvision.engine.loggers import build_backends

NOON = datetime.datetime(2025, 3, 1, 12, 0, 0)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_folders_are_named_by_their_start_and_never_shared(tmp_path):
    first = new_run_dir(tmp_path, NOON)
    same_second = [new_run_dir(tmp_path, NOON) for _ in range(11)]
    later = new_run_dir(tmp_path, NOON + datetime.timedelta(seconds=1))
    assert first.name == '20250301_120000' and same_second[0].name == '20250301_120000_1'
    assert later.name == '20250301_120001'
    for other in ('iter_2', 'pictures', 'tensorboard'):
        (tmp_path / other).mkdir()
    # _10 after _9 (not after _1 as text sorts), every other folder of the work dir left out
    assert run_dirs(tmp_path) == [first, *same_second, later] and latest_run_dir(tmp_path) == later
    assert run_dirs(tmp_path / 'missing') == [] and latest_run_dir(tmp_path / 'missing') is None


def tiny_run_config(tiny_config, path: Path) -> Path:
    cfg = tiny_config(**{'train_cfg.val_interval': 1, 'checkpoint_cfg.interval': 2})
    cfg.tasks = {'cls': cfg.to_dict()['tasks']['cls']}
    cfg.dump(str(path))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob('*')) if path.is_file()}


def test_a_new_run_gets_its_own_folder_and_a_resumed_run_continues_its_own(tiny_config, tmp_path, load_tool):
    config, work_dir = tiny_run_config(tiny_config, tmp_path / 'config.py'), tmp_path / 'work'
    train = load_tool('train').main

    def run(*options):
        train([str(config), '--work-dir', str(work_dir), *options])
        return latest_run_dir(work_dir)

    first = run('--cfg-options', 'train_cfg.max_iters=2')
    kept = snapshot(first)
    assert {'train.log', 'scalars.jsonl', 'metrics.jsonl', 'env.json', 'config.py'} <= set(kept)
    second = run('--cfg-options', 'train_cfg.max_iters=2', 'randomness.seed=1')
    assert second != first and snapshot(first) == kept, 'the first run\'s logs are untouched'
    resumed = run('--resume', '--cfg-options', 'train_cfg.max_iters=4', 'randomness.seed=1')
    assert resumed == second and run_dirs(work_dir) == [first, second], 'the checkpoint\'s run goes on'
    assert snapshot(first) == kept
    # one run read as uninterrupted: the untrained evaluation, then each training and validation step once
    assert [(r['step'], 'loss/cls' in r) for r in read_lines(second / 'scalars.jsonl')] == [(0, False)] + [
        (step, training) for step in (1, 2, 3, 4) for training in (True, False)]
    assert [r['step'] for r in read_lines(second / 'metrics.jsonl')] == [0, 1, 2, 3, 4]
    log = (second / 'train.log').read_text()
    assert log.count(' iter 2/2 ') == 1 and 'resumed from' in log and log.count(' iter 4/4 ') == 1
    assert (work_dir / 'config.py').read_text() == (second / 'config.py').read_text(), 'the latest run\'s'


def test_env_json_names_the_versions_the_host_and_the_processes(tmp_path):
    import numpy

    write_json(tmp_path / 'env.json', collect_env(world_size=3))
    env = json.loads((tmp_path / 'env.json').read_text())
    assert env['packages']['torch'] == torch.__version__ and env['packages']['numpy'] == numpy.__version__
    assert {'torchvision', 'timm', 'mmengine', 'opencv', 'pycocotools', 'safetensors'} <= set(env['packages'])
    assert env['packages']['opencv'] is not None, 'found under the name of its wheel'
    assert env['world_size'] == 3 and env['hostname'] and env['python'] == '.'.join(map(str, sys.version_info[:3]))
    assert env['cuda'] == torch.version.cuda and (env['cudnn'] is None) == (not torch.cuda.is_available())


def git(repo: Path, *args: str) -> str:
    return subprocess.run(['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t', *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_is_the_checkouts_commit_and_whether_tracked_files_changed(tmp_path):
    repo = tmp_path / 'repo'
    (repo / 'package').mkdir(parents=True)
    git(repo, 'init', '-q')
    (repo / 'tracked.py').write_text('a = 1\n')
    git(repo, 'add', 'tracked.py')
    git(repo, 'commit', '-q', '-m', 'first')
    (repo / 'untracked.txt').write_text('not part of the source')
    assert git_state(repo) == dict(commit=git(repo, 'rev-parse', 'HEAD'), dirty=False)
    (repo / 'tracked.py').write_text('a = 2\n')
    assert git_state(repo)['dirty'] is True
    assert git_state(repo / 'package') is None, 'inside another checkout: not this source\'s commit'
    assert git_state(tmp_path) is None


class FakeWandb(types.ModuleType):
    """``wandb`` as far as the trainer uses it; ``calls`` records every call."""

    def __init__(self):
        super().__init__('wandb')
        self.calls = []

    def init(self, **options):
        self.calls.append(('init', options))
        run = types.SimpleNamespace(id=options.get('id', 'w1'))
        run.log = lambda scalars, step: self.calls.append(('log', step, scalars))
        run.finish = lambda: self.calls.append(('finish',))
        return run


class FakeMlflow(types.ModuleType):
    def __init__(self):
        super().__init__('mlflow')
        self.calls = []
        for name in ('set_tracking_uri', 'set_experiment', 'log_dict', 'end_run'):
            setattr(self, name, functools.partial(self.record, name))

    def record(self, name, *args, **kwargs):
        self.calls.append((name, *args, *sorted(kwargs.items())))

    def start_run(self, run_id=None, **kwargs):
        self.record('start_run', run_id=run_id, **kwargs)
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or 'm1'))

    def log_metrics(self, metrics, step):
        self.record('log_metrics', step, metrics)


@pytest.fixture
def trackers(monkeypatch):
    fakes = FakeWandb(), FakeMlflow()
    for fake in fakes:
        monkeypatch.setitem(sys.modules, fake.__name__, fake)
    return fakes


BACKENDS = [dict(type='wandb', project='mtv', entity='team'),
            dict(type='mlflow', experiment_name='mtv', tracking_uri='file:///tmp/x', tags={'a': 'b'})]


def test_trackers_log_every_scalar_and_a_resumed_run_continues_their_runs(tmp_path, trackers):
    wandb, mlflow = trackers
    run_dir = new_run_dir(tmp_path / 'work', NOON)
    writer = ScalarWriter(run_dir, tensorboard=False, backends=BACKENDS, config={'model': {'type': 'X'}})
    writer.write(1, {'loss/cls': 0.5, 'lr': 1e-3})
    writer.close()
    assert wandb.calls == [('init', dict(project='mtv', entity='team', name='work/20250301_120000', dir=str(run_dir),
                                         config={'model': {'type': 'X'}})),
                           ('log', 1, {'loss/cls': 0.5, 'lr': 1e-3}), ('finish',)]
    assert mlflow.calls == [('set_tracking_uri', 'file:///tmp/x'), ('set_experiment', 'mtv'),
                            ('start_run', ('run_id', None), ('run_name', 'work/20250301_120000'), ('tags', {'a': 'b'})),
                            ('log_dict', {'model': {'type': 'X'}}, 'config.json'),
                            ('log_metrics', 1, {'loss/cls': 0.5, 'lr': 1e-3}), ('end_run',)]
    wandb.calls.clear(), mlflow.calls.clear()
    ScalarWriter(run_dir, resume_step=1, tensorboard=False, backends=BACKENDS).write(2, {'lr': 1.0})
    assert wandb.calls[0][1]['id'] == 'w1' and wandb.calls[0][1]['resume'] == 'allow'
    assert ('start_run', ('run_id', 'm1')) in mlflow.calls and ('log_metrics', 2, {'lr': 1.0}) in mlflow.calls


def test_a_missing_tracker_names_its_pip_package_and_a_bad_entry_its_index(tmp_path, trackers, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # as if not installed
    with pytest.raises(ImportError, match=r"log_cfg.backends\[1\] \(type='wandb'\) needs the wandb package, which is "
                                          r'not installed: pip install wandb'):
        build_backends([BACKENDS[1], BACKENDS[0]], tmp_path)
    assert trackers[1].calls[-1] == ('end_run',), 'the tracker started before is closed again'
    with pytest.raises(ValueError, match=r"log_cfg.backends\[0\] must be a dict with type one of \['mlflow', "
                                         r"'wandb'\], got \{'type': 'comet'\}"):
        build_backends([dict(type='comet')], tmp_path)
    with pytest.raises(ValueError, match=r"log_cfg.backends\[0\] \(type='mlflow'\): .*'experiment'"):
        build_backends([dict(type='mlflow', experiment='x')], tmp_path)


def test_the_final_table_is_the_last_thing_on_screen_printed_once(tiny_config, tmp_path, load_tool, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(trainer_module, 'tqdm', functools.partial(tqdm, disable=False))  # a bar, as on a terminal
    config = tiny_run_config(tiny_config, tmp_path / 'config.py')
    load_tool('train').main([str(config), '--work-dir', str(tmp_path / 'work'), '--cfg-options',
                             'train_cfg.max_iters=2'])
    out, screen = capsys.readouterr()
    assert screen.count('evaluation at iteration 1:') == 1 and screen.count('final evaluation at iteration 2:') == 1
    tail = screen[screen.index('final evaluation at iteration 2:'):]
    assert '\r' not in tail and 'train:' not in tail, 'the bar is not drawn again below the table'
    assert 'top1' in tail and 'top1' not in out, 'logged once, not printed again'
