"""Where a run's numbers go: a run folder per launch in the work dir, holding the log, a JSON-lines scalars file,
the evaluations, TensorBoard, the environment and any optional tracker (:mod:`mtvision.engine.loggers`).

A work dir holds the checkpoints (``iter_<N>/``, ``last_checkpoint``), ``config.py``, ``metrics.json`` and
``pictures/`` as before, and one folder per run, named by its start time as mmengine names them
(``<YYYYmmdd_HHMMSS>/``, ``_1``, ``_2`` ... for runs started in the same second)::

    work_dir/20250301_120000/train.log, scalars.jsonl, metrics.jsonl, env.json, tensorboard/

A new run never writes into another run's folder. A resumed run continues the folder of the run that wrote its
checkpoint (the checkpoint header names it): its scalars and evaluations after the checkpoint's iteration are
dropped and ``train.log`` is appended to, so the folder reads as one run. A checkpoint from elsewhere, or one
written before run folders existed, starts a new folder.
"""
import contextlib
import datetime
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

logger = logging.getLogger('mtvision')


class _WithoutTraceback(logging.Formatter):
    """The console's format: a record's traceback goes to ``train.log`` only, so that the last line on the screen
    is the error's message."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class _AroundProgressBars(logging.StreamHandler):
    """A console handler that writes through ``tqdm.write``: an open progress bar on the console is cleared, the
    record written on its own line and the bar drawn again below it, so log lines (the per-interval training line,
    warnings) never land inside a bar; without a bar it writes as a plain StreamHandler."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def setup_logging(work_dir: Path | None = None, rank: int = 0) -> None:
    """INFO to the console and to ``work_dir/train.log`` on rank 0; errors alone to the console on other ranks
    (each rank says why it stopped, rank 0 says everything else)."""
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    where = '' if rank == 0 else f'rank {rank} '
    console = _AroundProgressBars(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    console.setFormatter(_WithoutTraceback(f'%(asctime)s {where}%(levelname)s %(message)s', datefmt='%H:%M:%S'))
    logger.addHandler(console)
    if work_dir is not None and rank == 0:
        file_handler = logging.FileHandler(Path(work_dir) / 'train.log')
        file_handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S'))
        logger.addHandler(file_handler)


def error_summary(error: BaseException) -> str:
    """``<Type>: <message>`` on one line. An error re-raised from a DataLoader worker carries the worker's
    traceback in its message: the last line of that is the worker's own summary of the error."""
    message = str(error).strip()
    if 'Original Traceback' in message:
        return message.splitlines()[-1].strip()
    return f'{type(error).__name__}: {message}' if message else type(error).__name__


@contextlib.contextmanager
def exit_on_error(what: str) -> Iterator[None]:
    """Ends the process when an exception escapes the block, after logging why: one ERROR record
    ``<what> stopped: <Type>: <message>`` (the traceback in ``train.log``; on the console before the message
    when no log file keeps it), then ``SystemExit(1)``. KeyboardInterrupt logs one line, no traceback, and exits
    with 130 (a shell's status for Ctrl-C)."""
    try:
        yield
    except KeyboardInterrupt:
        logger.warning('%s interrupted (KeyboardInterrupt)', what)
        raise SystemExit(130) from None
    except Exception as error:
        log_files = [handler.baseFilename for handler in logger.handlers if isinstance(handler, logging.FileHandler)]
        if log_files:
            logger.error('%s stopped: %s (traceback in %s)', what, error_summary(error), log_files[0], exc_info=error)
        else:
            traceback.print_exception(error, file=sys.stderr)
            logger.error('%s stopped: %s', what, error_summary(error))
        raise SystemExit(1) from error


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def text_table(rows: Sequence[Sequence[str]], right_align: bool = False) -> str:
    """``rows`` (the header first) as a plain-text table: columns two spaces apart, a dashed line under the
    header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(cell.rjust(width) if right_align else cell.ljust(width)
                       for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, '  '.join('-' * width for width in widths))
    return '\n'.join(lines)


def to_json(value, **kwargs) -> str:
    """Strict JSON: NaN and infinity (a metric with nothing to measure, e.g. COCO's mAP_l without large objects)
    become null, which every JSON reader accepts."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


def write_json(path: str | Path, value) -> None:
    """``value`` as indented strict JSON at ``path`` (parent folders created), replaced in one step."""
    from mtvision.checkpoint import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, to_json(value, indent=2))


RUN_KEY = 'run'  # the checkpoint header entry naming the run folder that wrote the checkpoint
RUN_NAME_FORMAT = '%Y%m%d_%H%M%S'
_RUN_NAME = re.compile(r'(\d{8}_\d{6})(?:_(\d+))?')


def run_dirs(work_dir: str | Path) -> list[Path]:
    """The run folders of ``work_dir``, oldest first."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    named = [(match.group(1), int(match.group(2) or 0), path) for path in work_dir.iterdir()
             if path.is_dir() and (match := _RUN_NAME.fullmatch(path.name))]
    return [path for *_, path in sorted(named)]


def latest_run_dir(work_dir: str | Path) -> Path | None:
    """The newest run folder of ``work_dir``, None when it has none."""
    found = run_dirs(work_dir)
    return found[-1] if found else None


def new_run_dir(work_dir: str | Path, now: datetime.datetime | None = None) -> Path:
    """A new, empty run folder ``work_dir/<YYYYmmdd_HHMMSS>``, with ``_1``, ``_2`` ... after a run started in the
    same second (``mkdir`` decides, so two processes never share one)."""
    stamp = (now or datetime.datetime.now()).strftime(RUN_NAME_FORMAT)
    for count in itertools.count():
        path = Path(work_dir) / (f'{stamp}_{count}' if count else stamp)
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue


def checkpoint_run_dir(work_dir: str | Path, checkpoint: str | Path) -> Path | None:
    """The run folder of ``work_dir`` that wrote ``checkpoint`` (a checkpoint of this work dir whose header names
    a run folder that is still there), else None."""
    from mtvision.checkpoint import read_metadata

    work_dir, checkpoint = Path(work_dir), Path(checkpoint)
    if checkpoint.resolve().parent != work_dir.resolve():
        return None
    try:
        name = read_metadata(checkpoint).get(RUN_KEY, '')
    except (OSError, ValueError):  # unreadable: the trainer says so when it loads it
        return None
    run_dir = work_dir / name
    return run_dir if _RUN_NAME.fullmatch(name) and run_dir.is_dir() else None


def open_run_dir(work_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The folder of this run's logs: when resuming ``checkpoint``, the folder of the run that wrote it, else a
    new one."""
    return (checkpoint is not None and checkpoint_run_dir(work_dir, checkpoint)) or new_run_dir(work_dir)


def _lines_up_to(path: Path, step: int) -> list[dict]:
    """The records of the JSON-lines file ``path`` up to ``step`` ([] without the file)."""
    if not path.exists():
        return []
    return [record for record in map(json.loads, path.read_text().splitlines()) if record['step'] <= step]


def _rewrite_lines(path: Path, records: list[dict]) -> None:
    path.write_text(''.join(to_json(record) + '\n' for record in records))


def _append_line(path: Path, record: dict) -> None:
    with open(path, 'a') as f:
        f.write(to_json(record) + '\n')


class ScalarWriter:
    """A run folder's numbers: appends ``{'step': n, name: value, ...}`` lines to ``scalars.jsonl`` (mirrored to
    TensorBoard and the ``log_cfg.backends`` trackers) and each evaluation's metrics to ``metrics.jsonl``.

    On resume (``resume_step``), lines after the resumed step (written by the interrupted run after its last
    checkpoint) are dropped, so the files read as one uninterrupted run. A new run (no ``resume_step``) refuses a
    folder that already holds numbers: they belong to another run.

    Args:
        run_dir: the run folder (:func:`open_run_dir`).
        resume_step: the iteration the run resumes at, or None for a new run.
        tensorboard: mirror the scalars to ``run_dir/tensorboard``.
        backends: ``log_cfg.backends``, the optional trackers (:func:`mtvision.engine.loggers.build_backends`).
        config: the run's config as plain data, recorded by the trackers.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True,
                 backends: list[dict] | None = None, config: dict | None = None):
        from mtvision.engine.loggers import build_backends

        self.run_dir = Path(run_dir)
        self.path, self.metrics_path = self.run_dir / 'scalars.jsonl', self.run_dir / 'metrics.jsonl'
        if resume_step is None:
            used = [path for path in (self.path, self.metrics_path) if path.exists() and path.stat().st_size]
            if used:
                raise FileExistsError(f'{used[0]} holds the numbers of another run: a new run writes into a new run '
                                      f'folder (mtvision.engine.logging.new_run_dir)')
        self.run_dir.mkdir(parents=True, exist_ok=True)
        step = -1 if resume_step is None else resume_step
        self.records = _lines_up_to(self.path, step)
        _rewrite_lines(self.path, self.records)
        _rewrite_lines(self.metrics_path, _lines_up_to(self.metrics_path, step))
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for
            self.tensorboard = SummaryWriter(str(self.run_dir / 'tensorboard'), purge_step=resume_step)
        self.backends = build_backends(backends or [], self.run_dir, config, resumed=resume_step is not None)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        record = {'step': step, **scalars}
        self.records.append(record)
        _append_line(self.path, record)
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
        for backend in self.backends:
            backend.log(step, scalars)

    def write_metrics(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None:
        """An evaluation's metrics, per task, as one ``metrics.jsonl`` line (their scalars go through
        :meth:`write`)."""
        _append_line(self.metrics_path, {'step': step, **results})

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        for backend in self.backends:
            backend.close()


# the libraries env.json records, each by the distributions that provide it (opencv under its wheels' names)
ENV_PACKAGES = {**{name: (name,) for name in ('torch', 'torchvision', 'timm', 'mmengine', 'numpy', 'pycocotools',
                                              'safetensors', 'tensorboard', 'tqdm', 'wandb', 'mlflow')},
                'opencv': ('opencv-python', 'opencv-python-headless', 'opencv-contrib-python',
                           'opencv-contrib-python-headless')}


def _version(*distributions: str) -> str | None:
    for name in distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def git_state(source: str | Path) -> dict | None:
    """``{'commit': sha, 'dirty': bool}`` of the git checkout whose top folder is ``source``, or None (not a
    checkout, e.g. an installed wheel; no git program). Untracked files do not count as dirty."""
    def git(*args: str) -> str:
        return subprocess.run(['git', '-C', str(source), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        if Path(git('rev-parse', '--show-toplevel')).resolve() != Path(source).resolve():
            return None  # a checkout of something else around an installed copy
        return dict(commit=git('rev-parse', 'HEAD'), dirty=bool(git('status', '--porcelain', '--untracked-files=no')))
    except (OSError, subprocess.SubprocessError):
        return None


def collect_env(world_size: int = 1) -> dict:
    """What a run ran with, for ``env.json``: the command, mtvision's version and git commit (when it runs from a
    checkout), Python, the libraries' versions (None: not installed), CUDA, cuDNN and the GPUs when there are
    some, the host, its CPUs and torch's threads, and the number of processes."""
    import torch

    import mtvision

    source = Path(mtvision.__file__).resolve().parents[1]
    cuda = torch.cuda.is_available()
    return dict(
        argv=sys.argv, mtvision=mtvision.__version__, git=git_state(source), python=platform.python_version(),
        # torch's own version string keeps the build (+cu130, +cpu), which the distribution's leaves out
        packages={name: _version(*distributions) for name, distributions in ENV_PACKAGES.items()} | dict(
            torch=torch.__version__),
        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None,
        gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        hostname=socket.gethostname(), platform=platform.platform(), cpus=os.cpu_count(),
        threads=torch.get_num_threads(), world_size=world_size,
        started=datetime.datetime.now().isoformat(timespec='seconds'))


class IterationTimer:
    """The numbers of the training log line, per logging interval: seconds per step, seconds per step spent waiting
    for batches, peak device memory, images per second over all ranks, MFU, and the ETA (as mmengine's
    ``IterTimerHook`` and ``LoggerHook`` report them).

    Around each step the trainer calls ``start_step()``, ``start_data()`` / ``end_data()`` around drawing the
    batches, and ``end_step(images)``; every ``log_cfg.interval`` steps, ``summary`` gives the line and the
    scalars and starts the next interval. A step's time runs from ``start_step`` to ``end_step``: evaluation and
    checkpoints between steps are not in it, nor in the ETA.

    Args:
        world_size: ranks training alike (the same batch sizes): images/s counts them all.
        device: the training device; on CUDA the peak ``torch.cuda.max_memory_allocated`` of each interval is
            reported (CPU reports none: a process's max RSS is a lifetime peak and leaves out DataLoader workers).
        flops_per_image: per task, training FLOPs of one image (``flops.training_flops_per_image``); MFU is
            reported when every task of the interval has one and ``peak_flops`` is known.
        peak_flops: the device's peak FLOP/s (``flops.peak_flops``).
    """

    def __init__(self, world_size: int = 1, device: torch.device | str = 'cpu',
                 flops_per_image: Mapping[str, float] | None = None, peak_flops: float | None = None):
        self.world_size = world_size
        self.device = torch.device(device)
        self.flops_per_image = dict(flops_per_image or {})
        self.peak_flops = peak_flops
        self.run_time, self.run_steps = 0.0, 0  # every step timed by this timer: the ETA's average
        self._step_start = self._data_start = None
        self._start_interval()

    def _start_interval(self) -> None:
        self.steps, self.step_time, self.data_time, self.images = 0, 0.0, 0.0, 0
        self.flops: float | None = 0.0 if self.flops_per_image else None
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)

    def start_step(self) -> None:
        self._step_start = time.perf_counter()

    def start_data(self) -> None:
        self._data_start = time.perf_counter()

    def end_data(self) -> None:
        self.data_time += time.perf_counter() - self._data_start

    def end_step(self, images: Mapping[str, int]) -> None:
        """``images``: per task, the images this rank trained on in the step (all micro-batches)."""
        elapsed = time.perf_counter() - self._step_start
        self.steps += 1
        self.step_time += elapsed
        self.run_steps += 1
        self.run_time += elapsed
        self.images += sum(images.values())
        if self.flops is not None and all(task in self.flops_per_image for task in images):
            self.flops += sum(self.flops_per_image[task] * count for task, count in images.items())
        else:
            self.flops = None

    def scalars(self) -> dict[str, float]:
        """The interval's averages: ``time`` and ``data_time`` (s per step), ``images_per_s`` (all ranks),
        ``memory`` (peak MiB allocated, CUDA only) and ``mfu`` (a fraction, when the FLOPs are known)."""
        if not self.steps:
            return {}
        scalars = dict(time=self.step_time / self.steps, data_time=self.data_time / self.steps,
                       images_per_s=self.images * self.world_size / self.step_time)
        if self.device.type == 'cuda':
            scalars['memory'] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        if self.flops is not None and self.peak_flops:
            scalars['mfu'] = self.flops / self.step_time / self.peak_flops
        return scalars

    def eta(self, step: int, max_iters: int) -> float:
        """Seconds left to ``max_iters``: the average step time of the run so far times the steps left."""
        return self.run_time / self.run_steps * (max_iters - step) if self.run_steps else math.nan

    def summary(self, step: int, max_iters: int, lr: float, losses: Mapping[str, float]) -> tuple[str, dict]:
        """The log line of the interval ending at ``step`` and its scalars (:meth:`scalars`); starts the next
        interval. E.g. ``iter 120/600  lr 9.600e-04  eta 0:03:12  time 0.312  data_time 0.041  mem 1234M
        img/s 205.1  mfu 41.2%  cls 1.234  det 2.345``."""
        scalars = self.scalars()
        fields = [f'iter {step}/{max_iters}', f'lr {lr:.3e}']
        if scalars:
            eta = datetime.timedelta(seconds=round(self.eta(step, max_iters)))
            fields += [f'eta {eta}', f'time {scalars["time"]:.3f}', f'data_time {scalars["data_time"]:.3f}']
            if 'memory' in scalars:
                fields.append(f'mem {scalars["memory"]:.0f}M')
            fields.append(f'img/s {scalars["images_per_s"]:.1f}')
            if 'mfu' in scalars:
                fields.append(f'mfu {scalars["mfu"]:.1%}')
        fields += [f'{name} {value:.4g}' for name, value in losses.items()]
        self._start_interval()
        return '  '.join(fields), scalars
