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
    group: str | None = None  # its task group (``task_groups``): whose dataset and batches it shares in training
    # applied to its normalised training batches on the device (mtvision.data.batch_augments): MixUp, CutMix...
    batch_augments: list[dict] = field(default_factory=list)

    @property
    def source(self) -> str:
        """Where its training batches come from: its group, or the task itself."""
        return self.group or self.name

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


def build_tasks(tasks_cfg: Mapping, train: bool = True, val: bool = True,
                groups_cfg: Mapping | None = None) -> dict[str, Task]:
    """Build every task's datasets; checks that each type is registered (``TASK_TYPES``), the head's class count
    against the dataset's, and what the type checks of its datasets (a classification task's val set lists the
    training classes in their order).

    A task of a group (``tasks.X.group``, defined in ``groups_cfg``: the config's ``task_groups``) trains on the
    group's dataset, built once and shared by the group's tasks (the same object), with the group's batch size:
    the dataset returns, per image, a dict of targets keyed by task type, and each task reads its type's entry.
    """
    tasks, group_datasets = {}, {}
    for name, cfg in tasks_cfg.items():
        spec = task_type_spec(cfg['type'], f'tasks.{name}.type')
        group = cfg.get('group')
        group_cfg = (groups_cfg or {}).get(group) if group else None
        if group and train and group_cfg is None:
            raise ValueError(f'tasks.{name}.group={group!r}: no task_groups.{group} given to build its dataset from')
        if not train:
            train_dataset = None
        elif group_cfg is not None:
            if group not in group_datasets:
                group_datasets[group] = _build_dataset(group_cfg['train_dataset'], f'task_groups.{group}.train_dataset')
            train_dataset = group_datasets[group]
        else:
            train_dataset = _build_dataset(cfg['train_dataset'], f'tasks.{name}.train_dataset')
        val_cfg = cfg.get('val_dataset')
        val_dataset = _build_dataset(val_cfg, f'tasks.{name}.val_dataset') if val and val_cfg else None
        spec.check_datasets(train_dataset, val_dataset, f'tasks.{name}')
        head = to_plain(cfg['head'])
        for split, dataset in (('train', train_dataset), ('val', val_dataset)):
            dataset_classes = getattr(dataset, 'num_classes', None)
            if dataset_classes is not None and 'num_classes' in head and head['num_classes'] != dataset_classes:
                raise ValueError(f'tasks.{name}.head.num_classes={head["num_classes"]} but the {split} dataset has '
                                 f'{dataset_classes} classes')
        train_cfg = group_cfg['train_dataset'] if group_cfg is not None else cfg.get('train_dataset', {})
        mean, std = normalize_stats((val_cfg or train_cfg).get('pipeline'))
        batch_size = group_cfg['batch_size'] if group_cfg is not None else cfg.get('batch_size',
                                                                                    cfg.get('val_batch_size', 1))
        num_workers = (group_cfg if group_cfg is not None else cfg).get('num_workers', 0)
        tasks[name] = Task(name=name, type=cfg['type'], head=head, train_dataset=train_dataset,
                           val_dataset=val_dataset, batch_size=batch_size,
                           val_batch_size=cfg.get('val_batch_size', batch_size), num_workers=num_workers,
                           loss_weight=cfg.get('loss_weight', 1.0), metric=to_plain(cfg.get('metric', {})),
                           test_cfg=to_plain(cfg.get('test_cfg', {})), mean=mean, std=std, group=group,
                           batch_augments=to_plain(cfg.get('batch_augments') or []))
        if tasks[name].batch_augments:
            if group:  # mixing or erasing a group's images would change them under the other tasks' targets
                raise ValueError(f'tasks.{name}.batch_augments: tasks of a group (here {group!r}) share their '
                                 f'images with the group, which batch augments would change for every task')
            from mtvision.data.batch_augments import batch_augment_for

            batch_augment_for(tasks[name])  # bad configs fail here, before any data is drawn
    return tasks
