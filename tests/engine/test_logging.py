import json
import math
import shutil
from pathlib import Path

import pytest

from mtvision.data.errors import DataError
from mtvision.engine.logging import ScalarWriter, error_summary, exit_on_error, logger, setup_logging, to_json


def test_non_finite_values_become_null():
    text = to_json({'step': 1, 'val': {'mAP_l': math.nan, 'x': [math.inf, 1.5]}})
    assert json.loads(text) == {'step': 1, 'val': {'mAP_l': None, 'x': [None, 1.5]}}
    assert 'NaN' not in text and 'Infinity' not in text


def test_resumed_writer_drops_lines_after_the_checkpoint(tmp_path):
    writer = ScalarWriter(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        writer.write(step, {'loss/a': float(step)})
    resumed = ScalarWriter(tmp_path, resume_step=2, tensorboard=False)
    resumed.write(3, {'loss/a': 30.0})
    lines = [json.loads(line) for line in (tmp_path / 'scalars.jsonl').read_text().splitlines()]
    assert lines == [{'step': 1, 'loss/a': 1.0}, {'step': 2, 'loss/a': 2.0}, {'step': 3, 'loss/a': 30.0}]
    assert resumed.records == lines




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
    log = (tmp_path / 'run' / 'train.log').read_text()
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
    log = (tmp_path / 'run' / 'train.log').read_text()
    assert 'corrupt or unsupported image file' in log and 'Traceback (most recent call last)' in log
