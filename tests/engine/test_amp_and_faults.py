"""Mixed precision and the trainer's behaviour under faults: non-finite losses, full disks, signals, SIGKILL."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mtvision.checkpoint as checkpoint_module
from mtvision.engine import Trainer
from mtvision.checkpoint import find_last_checkpoint, load_training_state, read_weights
from mtvision.engine.logging import latest_run_dir

CLS_ONLY = {'train_cfg.val_interval': 1000, 'checkpoint_cfg.max_keep': 10}


def cls_only(tiny_config, **options):
    cfg = tiny_config(**{**CLS_ONLY, **options})
    cfg.tasks = {'cls': cfg.tasks['cls']}
    return cfg


def poison(trainer: Trainer, steps: set[int], value: float = float('inf')) -> None:
    """Make the loss of the given (0-based) iterations non-finite."""
    original = trainer.model.loss

    def loss(task, batch, normalizer=None):
        terms = original(task, batch, normalizer)
        if trainer.step in steps:
            terms = {name: term * value for name, term in terms.items()}
        return terms
    trainer.model.loss = loss


def test_bf16_cpu_step_runs_the_network_in_bf16_and_the_loss_in_fp32(tiny_config, tmp_path):
    cfg = cls_only(tiny_config, **{'optim_wrapper.type': 'AmpOptimWrapper', 'optim_wrapper.dtype': 'bfloat16',
                                   'train_cfg.max_iters': 2})
    trainer = Trainer(cfg, tmp_path, validate=False)
    assert trainer.scaler is None and trainer.autocast['dtype'] == torch.bfloat16
    seen = {}
    trainer.model.backbone.model.blocks[0].attn.qkv.register_forward_hook(
        lambda module, inputs, output: seen.setdefault('qkv', output.dtype) and None)
    head_loss = trainer.model.heads['cls'].loss
    trainer.model.heads['cls'].loss = lambda *a: {k: (seen.setdefault('loss', v.dtype), v)[1]
                                                  for k, v in head_loss(*a).items()}
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert seen['qkv'] == torch.bfloat16 and seen['loss'] == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert 'backbone.model.blocks.0.attn.qkv.weight' in changed


def test_grad_scaler_skips_the_step_with_an_inf_and_backs_off(tiny_config, tmp_path):
    cfg = cls_only(tiny_config, **{'optim_wrapper.type': 'AmpOptimWrapper', 'optim_wrapper.dtype': 'float16',
                                   'optim_wrapper.loss_scale': dict(init_scale=1024.0),
                                   'train_cfg.max_iters': 3, 'checkpoint_cfg.interval': 1})
    trainer = Trainer(cfg, tmp_path, validate=False)
    assert trainer.scaler is not None
    poison(trainer, {1})
    trainer.train()
    weights = [read_weights(tmp_path / f'iter_{i}') for i in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # iteration 2 changed nothing
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[0])  # iteration 3 did
    scales = [load_training_state(tmp_path / f'iter_{i}')['scaler']['scale'] for i in (1, 2)]
    assert scales[1] == scales[0] * 0.5 and trainer.skipped_steps == 1
    assert load_training_state(tmp_path / 'iter_3')['skipped_steps'] == 1


def test_non_finite_losses_without_a_scaler_stop_the_run_after_n_in_a_row(tiny_config, tmp_path):
    cfg = cls_only(tiny_config, **{'train_cfg.max_iters': 10, 'train_cfg.max_nonfinite_steps': 2,
                                   'checkpoint_cfg.interval': 1})
    trainer = Trainer(cfg, tmp_path, validate=False)
    poison(trainer, {1, 3, 4}, float('nan'))  # an isolated NaN is skipped; two in a row stop the run
    with pytest.raises(FloatingPointError, match=r'2 iterations in a row up to 5 .*cls/loss_cls'):
        trainer.train()
    assert trainer.skipped_steps == 3
    last = read_weights(find_last_checkpoint(tmp_path))
    assert find_last_checkpoint(tmp_path).name == 'iter_4'
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())


def test_a_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(tiny_config, tmp_path, monkeypatch):
    trainer = Trainer(cls_only(tiny_config, **{'train_cfg.max_iters': 2, 'checkpoint_cfg.interval': 1}), tmp_path,
                      validate=False)
    original = checkpoint_module.save_weights_file
    calls = []

    def save_weights_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return original(*args, **kwargs)
    monkeypatch.setattr(checkpoint_module, 'save_weights_file', save_weights_file)
    with pytest.raises(OSError, match=r'cannot write the checkpoint of iteration 2 to .*No space left on device; '
                                      r'the last complete checkpoint is .*iter_1, unchanged'):
        trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(('iter', '.iter'))) == ['iter_1']
    assert find_last_checkpoint(tmp_path).name == 'iter_1'
    read_weights(tmp_path / 'iter_1')


# A training process for the signal tests: the config from a file, resume from the work dir's last checkpoint;
# with WRITE_HANG set, the second checkpoint's state file hangs half-written (the test kills the process there).
TRAIN_SCRIPT = '''
import os, sys, time, torch
torch.set_num_threads(1)
from mmengine.config import Config
import mtvision.checkpoint as checkpoint_module
from mtvision.engine import Trainer
config, work_dir = sys.argv[1], sys.argv[2]
if os.environ.get('WRITE_HANG'):
    original, calls = checkpoint_module.fsync_write, []
    def fsync_write(path, write):
        if path.name != 'training_state.pth':
            return original(path, write)
        calls.append(path)
        if len(calls) == 2:
            with open(path, 'wb') as f:
                f.write(b'half a file')
            open(os.environ['WRITE_HANG'], 'w').close()
            time.sleep(600)
        return original(path, write)
    checkpoint_module.fsync_write = fsync_write
if os.environ.get('SLOW_STEPS'):
    original_step = Trainer._optimizer_step
    def slow_step(self, *args):
        time.sleep(float(os.environ['SLOW_STEPS']))
        return original_step(self, *args)
    Trainer._optimizer_step = slow_step
trainer = Trainer(Config.fromfile(config), work_dir, resume='auto', validate=False)
trainer.train()
print('interrupted' if trainer.interrupted else 'finished', trainer.step, flush=True)
'''


def start(tmp_path, cfg, work_dir, **env):
    config = tmp_path / 'config.py'
    cfg.dump(str(config))
    script = tmp_path / 'train_script.py'
    script.write_text(TRAIN_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(config), str(work_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError('the training process did not get there in time')
        time.sleep(0.05)


def finish(process) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out


def test_sigkill_during_a_checkpoint_write_then_resume_matches_the_uninterrupted_run(tiny_config, tmp_path):
    cfg = cls_only(tiny_config, **{'train_cfg.max_iters': 6, 'checkpoint_cfg.interval': 2})
    assert 'finished 6' in finish(start(tmp_path, cfg, tmp_path / 'reference'))

    work_dir, hang = tmp_path / 'killed', tmp_path / 'hanging'
    process = start(tmp_path, cfg, work_dir, WRITE_HANG=str(hang))
    wait_for(hang.exists)  # iter_4's state file is half written
    process.kill()
    process.wait()
    assert find_last_checkpoint(work_dir).name == 'iter_2'  # the half-written one is not a checkpoint
    assert 'finished 6' in finish(start(tmp_path, cfg, work_dir))
    reference, resumed = read_weights(tmp_path / 'reference'), read_weights(work_dir)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert not list(work_dir.glob('.iter_*'))  # the resumed run's own writes left no temporary folder


def test_sigterm_writes_a_checkpoint_and_exits_cleanly_and_sigkill_mid_training_resumes(tiny_config, tmp_path):
    cfg = cls_only(tiny_config, **{'train_cfg.max_iters': 1000, 'checkpoint_cfg.interval': 1000,
                                   'log_cfg.interval': 1})
    work_dir = tmp_path / 'run'
    process = start(tmp_path, cfg, work_dir, SLOW_STEPS='0.05')
    wait_for(lambda: latest_run_dir(work_dir) and (latest_run_dir(work_dir) / 'scalars.jsonl').exists() and
             (latest_run_dir(work_dir) / 'scalars.jsonl').read_text().count('\n') >= 3)
    scalars = latest_run_dir(work_dir) / 'scalars.jsonl'  # the resumed run below continues this run's folder
    process.send_signal(signal.SIGTERM)
    out = finish(process)
    step = int(out.split()[-1])
    assert out.startswith('interrupted') and 3 <= step < 1000
    assert find_last_checkpoint(work_dir).name == f'iter_{step}'

    # SIGKILL between checkpoints: the next start resumes from the SIGTERM checkpoint
    process = start(tmp_path, cfg, work_dir, SLOW_STEPS='0.05')
    wait_for(lambda: scalars.read_text().count('\n') >= step + 2)
    process.kill()
    process.wait()
    assert find_last_checkpoint(work_dir).name == f'iter_{step}'
    assert load_training_state(work_dir)['step'] == step


def test_skip_bad_samples_trains_past_a_corrupt_image_and_counts_it(tiny_config, tiny_data, tmp_path):
    import json
    import shutil

    from mtvision.data import DataError

    data = tmp_path / 'data'
    shutil.copytree(tiny_data / 'classification', data / 'classification')
    corrupt = sorted((data / 'classification' / 'train').rglob('*.jpg'))[0]
    corrupt.write_bytes(b'not a jpeg')

    def config(**options):
        cfg = cls_only(tiny_config, **{'train_cfg.max_iters': 4, 'log_cfg.interval': 4, **options})
        cfg.tasks['cls']['train_dataset']['data_root'] = str(data / 'classification' / 'train')
        return cfg
    with pytest.raises(DataError, match=corrupt.name):
        Trainer(config(), tmp_path / 'strict', validate=False).train()
    trainer = Trainer(config(**{'train_cfg.skip_bad_samples': True}), tmp_path / 'skipping', validate=False)
    trainer.train()  # 4 steps x 2 images: every one of the 8 training images is read once, the corrupt one too
    record = json.loads((trainer.run_dir / 'scalars.jsonl').read_text().splitlines()[-1])
    assert record['data/skipped/cls'] == 1 and trainer.samples_drawn['cls'] == 8
