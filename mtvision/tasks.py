"""A task pairs a dataset with a head, a loss weight and a metric; a config lists them by name."""
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from mtvision.config import to_plain
from mtvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mtvision.registry import DATASETS, TASK_TYPES  # noqa: F401 (TASK_TYPES: where task types are registered)
from mtvision.task_types import task_type_spec


@dataclass
class Task:
    name: str
    type: str
    head: dict
    train_dataset: Dataset | None
    val_dataset: Dataset | None
    batch_size: int
    val_batch_size: int
    num_workers: int = 0
    loss_weight: float = 1.0
    metric: dict = field(default_factory=dict)
    test_cfg: dict = field(default_factory=dict)  # how validation images are run and scored (evaluator)
    mean: tuple = IMAGENET_MEAN  # of the val pipeline's Normalize: to draw inputs as images again
    std: tuple = IMAGENET_STD

    @property
    def class_names(self) -> list[str] | None:
        dataset = self.val_dataset or self.train_dataset
        return list(getattr(dataset, 'classes', None) or []) or None


def _build_dataset(cfg: Mapping, where: str) -> Dataset:
    try:
        return DATASETS.build(to_plain(cfg))
    except TypeError as error:
        raise TypeError(f'{where}: {error}') from error


def normalize_stats(pipeline) -> tuple[tuple, tuple]:
    """``mean`` and ``std`` of a pipeline's Normalize step (ImageNet's when it has none)."""
    for step in pipeline or ():
        if step.get('type') == 'Normalize':
            return tuple(step['mean']), tuple(step['std'])
    return IMAGENET_MEAN, IMAGENET_STD


def build_tasks(tasks_cfg: Mapping, train: bool = True, val: bool = True) -> dict[str, Task]:
    """Build every task's datasets; checks that each type is registered (``TASK_TYPES``), the head's class count
    against the dataset's, and what the type checks of its datasets (a classification task's val set lists the
    training classes in their order)."""
    tasks = {}
    for name, cfg in tasks_cfg.items():
        spec = task_type_spec(cfg['type'], f'tasks.{name}.type')
        train_dataset = _build_dataset(cfg['train_dataset'], f'tasks.{name}.train_dataset') if train else None
        val_cfg = cfg.get('val_dataset')
        val_dataset = _build_dataset(val_cfg, f'tasks.{name}.val_dataset') if val and val_cfg else None
        spec.check_datasets(train_dataset, val_dataset, f'tasks.{name}')
        head = to_plain(cfg['head'])
        for split, dataset in (('train', train_dataset), ('val', val_dataset)):
            dataset_classes = getattr(dataset, 'num_classes', None)
            if dataset_classes is not None and 'num_classes' in head and head['num_classes'] != dataset_classes:
                raise ValueError(f'tasks.{name}.head.num_classes={head["num_classes"]} but the {split} dataset has '
                                 f'{dataset_classes} classes')
        mean, std = normalize_stats((val_cfg or cfg['train_dataset']).get('pipeline'))
        tasks[name] = Task(name=name, type=cfg['type'], head=head, train_dataset=train_dataset,
                           val_dataset=val_dataset, batch_size=cfg['batch_size'],
                           val_batch_size=cfg.get('val_batch_size', cfg['batch_size']),
                           num_workers=cfg.get('num_workers', 0), loss_weight=cfg.get('loss_weight', 1.0),
                           metric=to_plain(cfg.get('metric', {})),
                           test_cfg=to_plain(cfg.get('test_cfg', {})), mean=mean, std=std)
    return tasks
