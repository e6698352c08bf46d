import io
import json
import math
import re
import time
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from mtvision.data.errors import DataError
from mtvision.engine import evaluator
from mtvision.engine.flops import peak_flops, training_flops_per_image, vit_forward_flops
from mtvision.engine.logging import (IterationTimer, ScalarWriter, error_summary, exit_on_error, latest_run_dir, logger,
                                     setup_logging, to_json)
from mtvision.models.backbones.vit import ViT


def test_non_finite_values_become_null():
    text = to_json({'step': 1, 'val': {'mAP_l': math.nan, 'x': [math.inf, 1.5]}})
    assert json.loads(text) == {'step': 1, 'val': {'mAP_l': None, 'x': [None, 1.5]}}
    assert 'NaN' not in text and 'Infinity' not in text


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resumed_writer_drops_lines_after_the_checkpoint(tmp_path):
    writer = ScalarWriter(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        writer.write(step, {'loss/a': float(step)})
        writer.write_metrics(step, {'cls': {'top1': 10.0 * step}})
    resumed = ScalarWriter(tmp_path, resume_step=2, tensorboard=False)
    resumed.write(3, {'loss/a': 30.0})
    resumed.write_metrics(3, {'cls': {'top1': 33.0}})
    lines = read_lines(tmp_path / 'scalars.jsonl')
    assert lines == [{'step': 1, 'loss/a': 1.0}, {'step': 2, 'loss/a': 2.0}, {'step': 3, 'loss/a': 30.0}]
    assert resumed.records == lines
    metrics = read_lines(tmp_path / 'metrics.jsonl')
    assert [(r['step'], r['cls']['top1']) for r in metrics] == [(1, 10), (2, 20), (3, 33)]


def test_a_new_run_refuses_a_folder_holding_another_runs_numbers(tmp_path):
    ScalarWriter(tmp_path, tensorboard=False).write(1, {'loss/a': 1.0})
    with pytest.raises(FileExistsError, match='scalars.jsonl holds the numbers of another run'):
        ScalarWriter(tmp_path, tensorboard=False)
    assert read_lines(tmp_path / 'scalars.jsonl') == [{'step': 1, 'loss/a': 1.0}], 'left as it was'




def fail(error: BaseException):
    with pytest.raises(SystemExit) as stopped, exit_on_error('training'):
        raise error
    return stopped.value.code


def test_a_fatal_error_is_one_line_on_screen_and_a_traceback_in_train_log(tmp_path, capsys, restore_logging):
    setup_logging(tmp_path)
    assert fail(ValueError('bad value')) == 1
    screen = capsys.readouterr().err
    assert 'Traceback' not in screen
    assert screen.strip().splitlines()[-1].endswith(
        f'ERROR training stopped: ValueError: bad value (traceback in {tmp_path / "train.log"})')
    log = (tmp_path / 'train.log').read_text()
    assert 'ERROR training stopped: ValueError: bad value' in log and 'Traceback (most recent call last)' in log


def test_without_a_log_file_the_traceback_comes_before_the_message(capsys, restore_logging):
    setup_logging()
    assert fail(KeyError('weights')) == 1
    screen = capsys.readouterr().err.strip().splitlines()
    assert screen[0] == 'Traceback (most recent call last):'
    assert screen[-1].endswith("ERROR training stopped: KeyError: 'weights'")


def test_keyboard_interrupt_exits_130_without_a_traceback(tmp_path, capsys, restore_logging):
    setup_logging(tmp_path)
    assert fail(KeyboardInterrupt()) == 130
    screen = capsys.readouterr().err.strip().splitlines()
    assert len(screen) == 1 and screen[0].endswith('WARNING training interrupted (KeyboardInterrupt)')
    assert 'Traceback' not in (tmp_path / 'train.log').read_text()


def test_an_error_from_a_dataloader_worker_is_summarised_by_the_workers_last_line():
    # torch re-raises a worker's error as the same type, the worker's traceback as its message
    error = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                      '  File "x.py", line 1, in f\nmtvision.data.errors.DataError: \'a.png\', index 3: corrupt\n')
    assert error_summary(error) == "mtvision.data.errors.DataError: 'a.png', index 3: corrupt"
    assert error_summary(AssertionError()) == 'AssertionError'


def test_other_ranks_log_errors_only_to_the_console_naming_the_rank(tmp_path, capsys, restore_logging):
    setup_logging(tmp_path, rank=1)
    logger.info('progress')
    logger.warning('a warning')
    assert fail(RuntimeError('NCCL timeout')) == 1
    screen = capsys.readouterr().err.strip().splitlines()
    assert screen[-1].endswith('rank 1 ERROR training stopped: RuntimeError: NCCL timeout')
    assert not any('progress' in line or 'a warning' in line for line in screen)
    assert not (tmp_path / 'train.log').exists(), 'rank 0 alone writes train.log'


def cls_only_config(tiny_config, path: Path, **cls_changes) -> Path:
    cfg = tiny_config()
    cfg.tasks = {'cls': dict(cfg.to_dict()['tasks']['cls'], **cls_changes)}
    cfg.dump(str(path))
    return path


def test_train_tool_logs_a_config_error_to_train_log_and_exits_1(tiny_config, tmp_path, load_tool, capsys,
                                                                 restore_logging):
    config = cls_only_config(tiny_config, tmp_path / 'config.py', batch_size='16')
    with pytest.raises(SystemExit) as stopped:
        load_tool('train').main([str(config), '--work-dir', str(tmp_path / 'run')])
    assert stopped.value.code == 1
    message = "training stopped: ConfigError: tasks.cls.batch_size must be an int, got '16' (str)"
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    log = (latest_run_dir(tmp_path / 'run') / 'train.log').read_text()
    assert message in log and 'Traceback (most recent call last)' in log


def test_train_tool_logs_a_data_error_after_closing_the_progress_bar(tiny_config, tiny_data, tmp_path, load_tool,
                                                                    capsys, restore_logging):
    images = tmp_path / 'images'
    shutil.copytree(tiny_data / 'classification' / 'train', images)
    for path in filter(Path.is_file, images.rglob('*')):
        path.write_bytes(b'not an image')
    config = cls_only_config(tiny_config, tmp_path / 'config.py',
                             train_dataset=dict(tiny_config().to_dict()['tasks']['cls']['train_dataset'],
                                                data_root=str(images)))
    with pytest.raises(SystemExit) as stopped:
        load_tool('train').main([str(config), '--work-dir', str(tmp_path / 'run'), '--no-validate',
                                 '--cfg-options', 'train_cfg.max_iters=2'])
    assert stopped.value.code == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'training stopped: DataError: ' in last_line and 'corrupt or unsupported image file' in last_line
    assert str(images) in last_line, 'the message names the file'
    log = (latest_run_dir(tmp_path / 'run') / 'train.log').read_text()
    assert 'corrupt or unsupported image file' in log and 'Traceback (most recent call last)' in log


class FakeClock:
    """``time.perf_counter`` reading the times of ``ticks``, one per call."""

    def __init__(self, monkeypatch, ticks):
        self.ticks = iter(ticks)
        monkeypatch.setattr(time, 'perf_counter', lambda: next(self.ticks))


def run_steps(timer, steps):
    """Each step as the trainer times it: ``(start, data_start, data_end, end, images)``; the clock reads them."""
    for _ in steps:
        timer.start_step()
        timer.start_data()
        timer.end_data()
        timer.end_step(_[4])


def ticks(steps):
    return [t for step in steps for t in step[:4]]


# two steps of 0.5 s and 0.3 s, waiting 0.1 s and 0.05 s for data; 8 then 4 images on this rank
STEPS = [(10.0, 10.0, 10.1, 10.5, {'cls': 2, 'det': 6}), (11.0, 11.2, 11.25, 11.3, {'cls': 4})]


def test_the_timer_averages_each_interval_and_counts_every_rank(monkeypatch):
    FakeClock(monkeypatch, ticks(STEPS))
    timer = IterationTimer(world_size=4, flops_per_image={'cls': 1e9, 'det': 3e9}, peak_flops=1e11)
    run_steps(timer, STEPS)
    line, scalars = timer.summary(2, 10, 9.6e-4, {'cls': 1.23456, 'det': 0.000123})
    assert scalars == pytest.approx(dict(time=0.4, data_time=0.075, images_per_s=12 * 4 / 0.8,
                                         mfu=(2 * 1e9 + 6 * 3e9 + 4 * 1e9) / 0.8 / 1e11))
    assert 'memory' not in scalars, 'no memory on a CPU'
    # 8 steps left at the run's 0.4 s per step: 3.2 s, shown to the second
    assert line == 'iter 2/10  lr 9.600e-04  eta 0:00:03  time 0.400  data_time 0.075  img/s 60.0  mfu 30.0%  ' \
                   'cls 1.235  det 0.000123'


def test_a_new_interval_forgets_the_last_but_the_eta_averages_the_whole_run(monkeypatch):
    later = [(20.0, 20.0, 20.0, 22.0, {'cls': 2})]
    FakeClock(monkeypatch, ticks(STEPS + later))
    timer = IterationTimer(flops_per_image={'det': 1.0}, peak_flops=1.0)  # cls has no FLOPs: no MFU
    run_steps(timer, STEPS)
    timer.summary(2, 7203, 1e-3, {})
    run_steps(timer, later)
    assert timer.scalars() == pytest.approx(dict(time=2.0, data_time=0.0, images_per_s=1.0))
    # (0.5 + 0.3 + 2.0) / 3 s per step, 7200 steps left: 6720 s
    assert timer.eta(3, 7203) == pytest.approx(6720)
    line, _ = timer.summary(3, 7203, 1e-3, {'cls': 2.0})
    assert line == 'iter 3/7203  lr 1.000e-03  eta 1:52:00  time 2.000  data_time 0.000  img/s 1.0  cls 2'
    assert timer.summary(3, 7203, 1e-3, {'cls': 2.0})[0] == 'iter 3/7203  lr 1.000e-03  cls 2', 'no steps, no timing'


def test_the_timer_reports_the_interval_peak_of_cuda_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, 'reset_peak_memory_stats', lambda device: calls.append(('reset', device)))
    monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda device: 1234.4 * 2 ** 20)
    FakeClock(monkeypatch, ticks(STEPS))
    timer = IterationTimer(device='cuda:0')
    run_steps(timer, STEPS)
    line, scalars = timer.summary(2, 2, 1e-3, {})
    assert scalars['memory'] == pytest.approx(1234.4) and 'mem 1234M' in line
    assert calls == [('reset', torch.device('cuda:0'))] * 2, 'reset at the start of each interval'


def test_vit_flops_against_a_count_by_hand():
    dim, depth, patch, size = 32, 2, 8, 64
    backbone = ViT(model_name='vit_tiny_patch16_224', img_size=size, patch_size=patch, embed_dim=dim, depth=depth,
                   num_heads=2)
    patches = (size // patch) ** 2  # 64, plus the class token
    # per token: qkv 3 D^2, proj D^2, fc1 and fc2 4 D^2 each; the patch embedding 3 p^2 D per patch
    by_hand = lambda tokens: (2 * 3 * patch ** 2 * dim * patches + 2 * depth * 12 * dim ** 2 * tokens  # noqa: E731
                              + 4 * depth * tokens ** 2 * dim)
    assert vit_forward_flops(backbone) == by_hand(65)
    assert vit_forward_flops(backbone, mask_ratio=0.75) == by_hand(1 + 16)
    model = SimpleNamespace(backbone=backbone, is_moe=False,
                            heads={'cls': SimpleNamespace(), 'mae': SimpleNamespace(mask_ratio=0.75)})
    assert training_flops_per_image(model) == {'cls': 3 * by_hand(65), 'mae': 3 * by_hand(17)}
    assert training_flops_per_image(SimpleNamespace(backbone=backbone, is_moe=True, heads={})) == {}


@pytest.mark.parametrize('mask_ratio', [None, 0.75])
def test_vit_flops_match_torchs_flop_counter(mask_ratio):
    backbone = ViT(model_name='vit_tiny_patch16_224', img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    for block in backbone.model.blocks:
        block.attn.fused_attn = False  # explicit q @ k^T and attention @ v matmuls, which the counter sees
    with FlopCounterMode(display=False) as counter:
        backbone(torch.zeros(3, 3, 64, 64), mask_ratio=mask_ratio)
    assert vit_forward_flops(backbone, mask_ratio) == counter.get_total_flops() / 3


@pytest.mark.parametrize('name, expected', [('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12),
                                            ('NVIDIA H200', 989e12), ('NVIDIA A100-SXM4-80GB', 312e12),
                                            ('NVIDIA GeForce GTX 1080', None)])
def test_peak_flops_of_known_gpus(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device: name)
    assert peak_flops('cuda:0') == expected
    assert peak_flops('cuda:0', peak_tflops=500) == 500e12, 'env_cfg.peak_tflops wins'


def test_peak_flops_is_unknown_on_cpu_and_must_be_positive():
    assert peak_flops('cpu') is None
    with pytest.raises(ValueError, match='env_cfg.peak_tflops must be positive, got 0'):
        peak_flops('cpu', peak_tflops=0)


def screen_lines(text: str) -> list[str]:
    """What a terminal shows: every carriage return starts the line anew."""
    return [line.rsplit('\r', 1)[-1] for line in text.split('\n')]


def test_log_lines_go_to_train_log_and_around_the_progress_bar(tmp_path, monkeypatch, capsys, restore_logging):
    """The trainer's wiring, simulated: the bar is open while the interval lines are logged and written."""
    setup_logging(tmp_path)
    steps = STEPS + [(12.0, 12.0, 12.1, 12.5, {'cls': 2}), (13.0, 13.0, 13.1, 13.5, {'cls': 2})]
    FakeClock(monkeypatch, ticks(steps))
    timer, writer = IterationTimer(), ScalarWriter(tmp_path, tensorboard=False)
    with tqdm(total=4, desc='train', file=sys.stderr, disable=False) as bar:
        for step, one in enumerate(steps, 1):
            run_steps(timer, [one])
            bar.update()
            if step % 2 == 0:
                line, scalars = timer.summary(step, 4, 1e-3, {'cls': 1.0})
                logger.info(line)
                writer.write(step, scalars)
    lines = screen_lines(capsys.readouterr().err)
    logged = [line for line in lines if 'INFO iter' in line]
    assert len(logged) == 2 and all(re.fullmatch(r'\d\d:\d\d:\d\d INFO iter [24]/4  .*cls 1', line) for line in logged)
    assert logged[1].endswith('iter 4/4  lr 1.000e-03  eta 0:00:00  time 0.500  data_time 0.100  img/s 4.0  cls 1')
    log = (tmp_path / 'train.log').read_text().splitlines()
    assert [line.split(' INFO ')[1] for line in log] == [line.split(' INFO ')[1] for line in logged]
    records = [json.loads(line) for line in (tmp_path / 'scalars.jsonl').read_text().splitlines()]
    assert records[1] == pytest.approx({'step': 4, 'time': 0.5, 'data_time': 0.1, 'images_per_s': 4.0})


class Numbers(Dataset):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, index):
        return torch.full((3, 2, 2), float(index % 2)), index % 2


class Parity(torch.nn.Module):
    """Logits of the two classes: the image's value is its class."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # the evaluator finds the device from the parameters
        self.heads = {'cls': SimpleNamespace(predict=lambda outputs: outputs)}

    def forward(self, task, images):
        value = images[:, 0, 0, 0]
        return torch.stack([1 - value, value], dim=1) * self.scale


@pytest.mark.parametrize('rank', [0, 1])
def test_evaluation_draws_a_bar_over_the_batches_on_rank_0(monkeypatch, capsys, rank):
    from mtvision.tasks import Task
    monkeypatch.setattr(evaluator, 'rank_and_world', lambda: (rank, 1))
    with tqdm(total=1, file=io.StringIO()) as default:  # tqdm's defaults: TQDM_DISABLE=1 when testing turns it off
        shown = rank == 0 and not default.disable
    task = Task(name='cls', type='classification', head={}, train_dataset=None, val_dataset=Numbers(), batch_size=2,
                val_batch_size=2)
    task.metric = dict(type='Accuracy', topk=(1,))
    assert evaluator.evaluate(Parity(), {'cls': task}) == {'cls': {'top1': 100.0}}
    screen = capsys.readouterr().err
    # the bar counts the task's batches (drawn at its start; leave=False clears it at the end)
    assert ('val cls:' in screen and '/3 [' in screen) == shown
