"""Where a run's numbers go: a JSON-lines scalars file, TensorBoard, and a log file beside them."""
import contextlib
import json
import logging
import math
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

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


def setup_logging(work_dir: Path | None = None, rank: int = 0) -> None:
    """INFO to the console and to ``work_dir/train.log`` on rank 0; errors alone to the console on other ranks
    (each rank says why it stopped, rank 0 says everything else)."""
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    where = '' if rank == 0 else f'rank {rank} '
    console = logging.StreamHandler(sys.stderr)
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
