"""Where a run's numbers go: a JSON-lines scalars file, TensorBoard, and a log file beside them."""
import contextlib
import datetime
import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
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


def to_json(value, **kwargs) -> str:
    """Strict JSON: NaN and infinity (a metric with nothing to measure, e.g. COCO's mAP_l without large objects)
    become null, which every JSON reader accepts."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


def write_json(path: str | Path, value) -> None:
    """``value`` as indented strict JSON at ``path`` (parent folders created), replaced in one step."""
    from mtvision.engine.checkpoint import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, to_json(value, indent=2))


class ScalarWriter:
    """Appends ``{'step': n, name: value, ...}`` lines to ``scalars.jsonl`` and mirrors them to TensorBoard.

    On resume, lines after the resumed step (written by the interrupted run after its last checkpoint) are
    dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, work_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(work_dir) / 'scalars.jsonl'
        self.records = []
        if self.path.exists() and resume_step is not None:
            self.records = [r for r in map(json.loads, self.path.read_text().splitlines()) if r['step'] <= resume_step]
        self.path.write_text(''.join(to_json(r) + '\n' for r in self.records))
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for
            self.tensorboard = SummaryWriter(str(Path(work_dir) / 'tensorboard'), purge_step=resume_step)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        record = {'step': step, **scalars}
        self.records.append(record)
        with open(self.path, 'a') as f:
            f.write(to_json(record) + '\n')
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


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
