"""Data audit: every problem of a config's datasets, each with its file and index, rather than the first one.

A dataset is audited in two passes that reuse the loaders' own checks (one implementation each, shared with
training):

1. it is built with ``errors='collect'`` (where its class takes the argument), so that the constructor's cheap
   checks (missing files named by annotations, bad boxes, unknown category ids, out-of-range class indices in
   list files, images without a label map) report every bad entry instead of raising on the first;
2. every remaining sample is read raw, i.e. built with an empty pipeline: the image and target are decoded and
   checked (corrupt or truncated images, label ids out of range, map and image sizes, depth dtype, COCO sizes,
   undecodable masks) but not augmented. A sample reports its first problem only, since a corrupt image
   hides whatever its label map holds.

A dataset whose constructor still raises (a missing folder, an annotation file that is not JSON) gives that one
finding. Wrapped datasets (``ImagesOf(dataset=...)``) are audited through their inner dataset.
"""
import inspect
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

from torch.utils.data import DataLoader, Dataset

import mtvision.data.datasets  # noqa: F401  (registers the datasets)
from mtvision.config import to_plain
from mtvision.data.errors import LEVELS, DataError
from mtvision.data.loader import limit_worker_threads
from mtvision.registry import DATASETS

__all__ = ['SPLITS', 'Finding', 'audit_dataset', 'audit_task', 'audit_tasks', 'format_findings']

logger = logging.getLogger(__name__)

SPLITS = ('train', 'val')
_READ_BATCH = 32  # samples per worker round trip: amortises the IPC of tiny results


@dataclass(frozen=True)
class Finding:
    """One problem of one dataset.

    ``path`` and ``index`` are those the loader's DataError names (see each loader for what its index counts:
    sample, annotation entry or line); ``level`` is ``'error'`` (training would stop, or read wrong data) or
    ``'warning'`` (loads, but probably wrong).
    """
    task: str | None
    split: str | None
    path: str | None
    index: int | None
    message: str
    level: str = 'error'

    def to_dict(self) -> dict:
        return asdict(self)


def audit_dataset(cfg: Mapping, task: str | None = None, split: str | None = None,
                  max_problems: int | None = None, num_workers: int = 0) -> list[Finding]:
    """Every problem of the dataset built from ``cfg`` (a DATASETS config); empty when it is clean.

    Args:
        cfg: the dataset config, as in a task's ``train_dataset``; its pipeline is ignored.
        task, split: copied into the findings.
        max_problems: stop reading after this many findings (a last warning says where it stopped).
        num_workers: DataLoader worker processes that read the samples (0: read in this process).
    """
    return _audit(cfg, task, split, max_problems, num_workers)[1]


def audit_task(name: str, task_cfg: Mapping, splits: Sequence[str] = SPLITS, max_problems: int | None = None,
               num_workers: int | None = None) -> list[Finding]:
    """Every problem of one task's ``train_dataset`` and ``val_dataset`` (those of ``splits`` it has).

    Also reports a head whose ``num_classes`` differs from the dataset's (what :func:`~mtvision.tasks.build_tasks`
    rejects), e.g. a class-index list file without ``classes`` whose largest index is too large.

    Args:
        name: the task's name in the config.
        task_cfg: the task's config (``tasks.<name>``).
        splits: which of ``'train'`` and ``'val'`` to audit.
        max_problems: per dataset, see :func:`audit_dataset`.
        num_workers: reader processes; None takes the task's own ``num_workers``.
    """
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise ValueError(f'unknown split(s) {unknown}; expected some of {SPLITS}')
    task_cfg = to_plain(task_cfg)
    workers = task_cfg.get('num_workers', 0) if num_workers is None else num_workers
    findings = []
    for split in splits:
        cfg = task_cfg.get(f'{split}_dataset')
        if not cfg:
            continue
        dataset, found = _audit(cfg, name, split, max_problems, workers)
        findings.extend(found)
        head_classes = task_cfg.get('head', {}).get('num_classes')
        dataset_classes = getattr(dataset, 'num_classes', None)
        if None not in (head_classes, dataset_classes) and head_classes != dataset_classes:
            findings.append(Finding(name, split, _source(cfg), None,
                                    f'tasks.{name}.head.num_classes={head_classes} but the {split} dataset has '
                                    f'{dataset_classes} classes'))
    return findings


def audit_tasks(tasks_cfg: Mapping, splits: Sequence[str] = SPLITS, max_problems: int | None = None,
                num_workers: int | None = None) -> list[Finding]:
    """:func:`audit_task` for every task of a config's ``tasks``, in config order."""
    findings = []
    for name, task_cfg in tasks_cfg.items():
        findings.extend(audit_task(name, task_cfg, splits, max_problems, num_workers))
    return findings


def format_findings(findings: Iterable[Finding]) -> str:
    """A table of the findings grouped by task and split (in order of first appearance), and a count line."""
    findings = list(findings)
    groups: dict[tuple, list[Finding]] = {}
    for finding in findings:
        groups.setdefault((finding.task, finding.split), []).append(finding)
    header = ('task', 'split', 'level', 'index', 'path', 'problem')
    rows = []
    for (task, split), members in groups.items():
        for position, finding in enumerate(members):
            rows.append((task or '-', split or '-') if position == 0 else ('', ''))
            rows[-1] += (finding.level, '-' if finding.index is None else str(finding.index),
                         finding.path or '-', finding.message)
    lines = []
    if rows:
        widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
        for row in [header, tuple('-' * len(name) for name in header), *rows]:
            cells = [cell.rjust(width) if column == 3 else cell.ljust(width)
                     for column, (cell, width) in enumerate(zip(row, widths))]
            lines.append('  '.join([*cells, row[-1]]))
    counts = {level: sum(finding.level == level for finding in findings) for level in LEVELS}
    if findings:
        lines.append(f'{_plural(counts["error"], "error")} and {_plural(counts["warning"], "warning")} in '
                     f'{_plural(len(groups), "dataset")}')
    else:
        lines.append('no problems found')
    return '\n'.join(lines)


def _plural(count: int, noun: str) -> str:
    return f'{count} {noun}{"" if count == 1 else "s"}'


def _source(cfg: Mapping) -> str | None:
    """The file or folder a dataset config reads, to name in findings about the whole dataset."""
    for key in ('ann_file', 'data_root', 'img_dir'):
        if cfg.get(key):
            return str(cfg[key])
    inner = cfg.get('dataset')
    return _source(inner) if isinstance(inner, Mapping) else None


def _raw_collecting(cfg: Mapping) -> dict:
    """``cfg`` with no pipeline and ``errors='collect'`` where the class takes them, wrapped datasets likewise."""
    cfg = dict(cfg)
    kind = cfg.get('type')
    cls = kind if isinstance(kind, type) else DATASETS.get(kind)
    if cls is None:
        raise KeyError(f'dataset type {kind!r} is not registered in DATASETS')
    parameters = inspect.signature(cls).parameters
    if 'pipeline' in parameters:
        cfg['pipeline'] = []
    if 'errors' in parameters:
        cfg['errors'] = 'collect'
    if isinstance(cfg.get('dataset'), Mapping):
        cfg['dataset'] = _raw_collecting(cfg['dataset'])
    return cfg


def _construction_problems(dataset: Dataset) -> list[DataError]:
    # vars(), not getattr: wrappers may forward attribute reads to the dataset they wrap, which is visited next
    found = list(vars(dataset).get('problems', ()))
    inner = vars(dataset).get('dataset')
    return found + (_construction_problems(inner) if isinstance(inner, Dataset) else [])


def _audit(cfg: Mapping, task: str | None, split: str | None, max_problems: int | None,
           num_workers: int) -> tuple[Dataset | None, list[Finding]]:
    if max_problems is not None and max_problems < 1:
        raise ValueError(f'max_problems must be positive, got {max_problems}')
    where = f'tasks.{task}.{split}_dataset' if task else str(cfg.get('type'))
    cfg = _raw_collecting(to_plain(cfg))
    try:
        dataset = DATASETS.build(cfg)
    except DataError as error:
        return None, [Finding(task, split, error.path, error.index, error.problem, error.level)]
    except TypeError as error:
        raise TypeError(f'{where}: {error}') from error
    findings = [Finding(task, split, error.path, error.index, error.problem, error.level)
                for error in _construction_problems(dataset)]
    truncated = max_problems is not None and len(findings) > max_problems
    findings = findings[:max_problems]
    read = 0
    if max_problems is None or len(findings) < max_problems:
        for result in _read_all(dataset, num_workers):
            read += 1
            if result is not None:
                findings.append(Finding(task, split, *result))
                if max_problems is not None and len(findings) >= max_problems:
                    break
    if truncated or read < len(dataset):
        findings.append(Finding(task, split, _source(cfg), None,
                                f'stopped after max_problems={max_problems} findings; samples from index {read} on '
                                f'were not read', 'warning'))
    logger.info('%s: %d samples read, %d findings', where, read, len(findings))
    return dataset, findings


def _read(dataset: Dataset, index: int) -> tuple[str | None, int | None, str, str] | None:
    """Read one sample: None when it is fine, else ``(path, index, message, level)`` (plain, cheap to send)."""
    try:
        dataset[index]
    except DataError as error:
        return error.path, error.index, error.problem, error.level
    except Exception as error:  # anything else that stops a sample stops training just as well
        return None, index, f'reading the sample raised {type(error).__name__}: {error}', 'error'
    return None


class _Reader(Dataset):
    """Reads samples in DataLoader workers and returns :func:`_read`'s result rather than the sample."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return _read(self.dataset, index)


def _read_all(dataset: Dataset, num_workers: int) -> Iterator:
    """:func:`_read` of every sample in index order."""
    if num_workers <= 0:
        yield from (_read(dataset, index) for index in range(len(dataset)))
        return
    loader = DataLoader(_Reader(dataset), batch_size=_READ_BATCH, num_workers=num_workers, collate_fn=list,
                        worker_init_fn=limit_worker_threads)
    for batch in loader:
        yield from batch
