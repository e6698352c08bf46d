"""Where a run's numbers go: a JSON-lines scalars file, TensorBoard, and a log file beside them."""
import json
import logging
import math
import sys
from pathlib import Path

logger = logging.getLogger('mtvision')


def setup_logging(work_dir: Path | None = None, rank: int = 0) -> None:
    """INFO to the console (rank 0) and to ``work_dir/train.log``."""
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        return
    fmt = logging.Formatter('%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if work_dir is not None:
        file_handler = logging.FileHandler(Path(work_dir) / 'train.log')
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)


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
