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
    trainer = Trainer(cfg, work_dir, resume='auto', load_from=str(load_from) if load_from else None)
    metrics = trainer.train()
    if trainer.interrupted:  # a stopped run's metrics are not the recipe's: later stages must not build on them
        raise SystemExit(f'{work_dir}: stopped at iteration {trainer.step} of {iters}; run the script again to resume')
    return metrics


def enter_scratch_folder(stack) -> Path:
    """A temporary folder, made the working directory until ``stack`` (a ``contextlib.ExitStack``) closes, so the
    configs' relative data paths lead into it (the ``--quick`` smoke runs' tiny data)."""
    import tempfile

    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    stack.callback(os.chdir, os.getcwd())
    os.chdir(scratch)
    return scratch


def add_run_arguments(parser, work_dir: str) -> None:
    """The command-line options :func:`start_runs` and ``train_recipe``'s callers read: ``--threads``,
    ``--work-dir``, ``--cfg-options`` (overrides of every training run's config, as ``tools/train.py``'s) and
    ``--quick``."""
    from mmengine.config import DictAction

    parser.add_argument('--threads', type=int, help="torch threads per run (env_cfg.num_threads; default: torch's)")
    parser.add_argument('--work-dir', default=work_dir)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help="overrides of every training run's config, as tools/train.py's")
    parser.add_argument('--quick', action='store_true', help='2 iterations, one seed, tiny data (a smoke test)')


def start_runs(args, stack) -> dict | None:
    """What the training benchmarks share before their runs: ``--quick`` (2 iterations, one seed, a scratch folder
    as the work dir) returns the tiny synthetic-data options for ``train_recipe``, else None; ``--threads`` also
    limits this process's own torch threads (the probes run here)."""
    tiny = None
    if args.quick:
        args.iters, args.seeds = 2, args.seeds[:1]
        args.work_dir = str(enter_scratch_folder(stack) / 'runs')
        tiny = dict(num_train=8, num_val=6)
    if args.threads:
        torch.set_num_threads(args.threads)
    return tiny


def tool(name: str):
    """The script ``tools/<name>.py`` as a module (its ``main(argv)`` returns the results it prints)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f'tool_{name}', ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def initial_weights(config: Path, seed: int, path: Path, options: dict | None = None) -> Path:
    """The weights ``config``'s model starts from with ``randomness.seed=seed``, written to ``path`` (with the
    backbone in the header, so the probes read it alone): a random-init baseline and a common start for runs."""
    from mtvision.config import load_config
    from mtvision.engine.logging import to_json
    from mtvision.fileio import save_weights_file
    from mtvision.models import backbone_config, build_model
    from mtvision.tasks import build_tasks

    if not Path(path).is_file():
        cfg = load_config(str(config), options or {})
        torch.manual_seed(seed)
        model = build_model(cfg, build_tasks(cfg.tasks, train=False, val=False))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_weights_file(path, model.state_dict(), metadata={'backbone': to_json(backbone_config(cfg))})
    return Path(path)


def frozen_probes(model: str | Path, data: Path, cache_dir: Path, config: Path | None = None) -> dict:
    """kNN top-1 at k=20 and the linear sweep's best top-1 (its held-out choice, scored on ``data``'s ``val/``) of
    the frozen backbone of ``model`` (anything the probes take) on the class folders under ``data``."""
    common = [str(model), '--data', str(data), '--cache-dir', str(cache_dir), '--num-workers', '0']
    common += ['--config', str(config)] if config is not None else []
    knn = tool('knn').main(common + ['--ks', '20'])
    linear = tool('linear_probe').main(common)
    return dict(knn=knn['results'][0]['top1'], linear=linear['best']['val']['top1'])
