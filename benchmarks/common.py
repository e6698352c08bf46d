"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, which puts this folder on the
import path)."""
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault('TQDM_DISABLE', '1')  # the trainer's progress bar would flood the tables

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / 'configs' / 'quickstart' / 'vit-tiny-p8_4task_synthetic.py'


def synchronized(fn: Callable, device) -> Callable:
    """``fn`` followed by a wait for ``device`` (a ``torch.device``) when it is a GPU, so a timer around the call
    counts the work it queued there."""
    if device.type != 'cuda':
        return fn

    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(device)
        return result
    return wrapped


def time_steps(step: Callable[[], None], steps: int) -> float:
    """Mean wall-clock seconds of ``steps`` calls of ``step``."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def alternate_timings(runs: dict[str, Callable[[], None]], steps: int, repeats: int,
                      warmup: int = 0) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Seconds per call of each run: ``warmup`` calls each, then ``repeats`` rounds that time ``steps`` calls of
    every run in turn (so drift in machine load hits them alike). Returns the medians and every round's times."""
    for run in runs.values():
        if warmup:
            time_steps(run, warmup)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(time_steps(run, steps))
    return {name: statistics.median(values) for name, values in times.items()}, times


def classification_trainer(data_root: Path, work_dir: Path, batch_size: int, pipeline: list | None = None,
                           **options):
    """The quick start's ViT and classification task alone, no evaluation, logging or checkpoints; ``pipeline``
    replaces the training pipeline; ``options`` are config overrides (``--cfg-options`` style keys)."""
    from mtvision.config import load_config
    from mtvision.engine import Trainer

    cfg = load_config(str(QUICKSTART), {'log_cfg.tensorboard': False, 'log_cfg.visualize': False,
                                        'checkpoint_cfg.interval': 10 ** 9, 'checkpoint_cfg.save_last': False,
                                        **options})
    cls = cfg.to_dict()['tasks']['cls']
    cls['train_dataset']['data_root'] = str(Path(data_root) / 'classification' / 'train')
    cls['batch_size'] = batch_size
    if pipeline is not None:
        cls['train_dataset']['pipeline'] = pipeline
    cfg.tasks = {'cls': cls}
    return Trainer(cfg, work_dir, validate=False)


def run_steps(trainer, steps: int) -> None:
    """``steps`` more training iterations of ``trainer``."""
    trainer.max_iters = trainer.step + steps
    trainer.train()


def train_recipe(config: Path, options: dict, iters: int, work_dir: Path, tiny_data: dict | None = None,
                 tasks: list[str] | None = None, load_from: Path | None = None, threads: int | None = None) -> dict:
    """The validation metrics of training ``config`` (its ``tasks`` only, when given) for ``iters`` iterations, its
    schedule shortened to fit, evaluated once at the end, nothing logged or drawn; ``tiny_data``: synthetic-data
    options for a smoke run. A run finished earlier in ``work_dir`` (its ``metrics.json`` at ``iters``) is read
    back, not trained again; one stopped midway resumes from its last checkpoint (resuming is exact)."""
    import json

    from mtvision.config import load_config
    from mtvision.data.synthetic import ensure_synthetic
    from mtvision.engine import Trainer
    from mtvision.engine.extraction import shortened_schedule

    finished = Path(work_dir) / 'metrics.json'
    if finished.is_file() and json.loads(finished.read_text())['step'] == iters:
        return json.loads(finished.read_text())['metrics']
    cfg = load_config(str(config), {
        **options, 'train_cfg.max_iters': iters, 'train_cfg.val_interval': iters, 'train_cfg.val_at_start': False,
        'checkpoint_cfg.interval': iters, 'log_cfg.tensorboard': False, 'log_cfg.visualize': False,
        'log_cfg.interval': iters, 'env_cfg.num_threads': threads})
    cfg.param_scheduler = shortened_schedule(cfg.to_dict()['param_scheduler'], iters)
    if tasks is not None:
        cfg.tasks = {name: cfg.tasks[name] for name in tasks}
    if tiny_data is not None:
        cfg.synthetic_data = dict(cfg.synthetic_data, **tiny_data)
        for task in cfg.tasks.values():
            task.val_batch_size = min(task.val_batch_size, 4)
    ensure_synthetic(**cfg.synthetic_data)
    return Trainer(cfg, work_dir, resume='auto', load_from=str(load_from) if load_from else None).train()


def enter_scratch_folder(stack) -> Path:
    """A temporary folder, made the working directory until ``stack`` (a ``contextlib.ExitStack``) closes, so the
    configs' relative data paths lead into it (the ``--quick`` smoke runs' tiny data)."""
    import tempfile

    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    stack.callback(os.chdir, os.getcwd())
    os.chdir(scratch)
    return scratch
