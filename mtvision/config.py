"""Configs: mmengine's text style (``_base_`` inheritance, ``--cfg-options``), checked against a schema.

Top-level names starting with ``_`` are the config file's own variables (paths, pipelines shared by several
entries) and are not checked. Every other key must be known: a typo is an error naming the key, not a setting
that silently does nothing. Keys of registered components (``type=...``) are checked when the component is built.
The settings the trainer reads (:data:`VALUE_RULES`) are checked for type and range here, so that a quoted number
(``--cfg-options tasks.cls.batch_size="'16'"``) fails at start-up naming its key, not deep in the first iteration.
"""
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from mmengine.config import Config

TASK_KEYS = {'type', 'head', 'train_dataset', 'val_dataset', 'batch_size', 'val_batch_size', 'num_workers',
             'loss_weight', 'metric', 'test_cfg', 'group', 'batch_augments'}
# a task group: tasks labelled on the same images, drawn as one batch and run through one backbone forward
GROUP_KEYS = {'train_dataset', 'batch_size', 'num_workers'}

# key -> the keys allowed inside it (None: any value, checked where it is used)
SCHEMA: dict[str, set[str] | None] = {
    'model': {'type', 'backbone', 'moe_loss_weights'},
    'tasks': None,  # task name -> TASK_KEYS, checked in check_config
    'task_groups': None,  # group name -> GROUP_KEYS, checked in check_config
    'mixer': {'strategy', 'seed', 'tasks_per_step', 'temperature', 'stages'},
    'aggregator': None,
    'optim_wrapper': {'type', 'optimizer', 'paramwise_cfg', 'clip_grad', 'dtype', 'loss_scale'},
    'auto_scale_lr': {'base_batch_size', 'enable', 'task'},
    'param_scheduler': None,
    'train_cfg': {'max_iters', 'val_interval', 'val_at_start', 'accumulate_steps', 'max_nonfinite_steps',
                  'skip_bad_samples'},
    'checkpoint_cfg': {'interval', 'max_keep', 'save_last'},
    'log_cfg': {'interval', 'tensorboard', 'visualize', 'backends'},
    'randomness': {'seed', 'deterministic'},
    'ema_cfg': {'decay', 'evaluate'},
    'env_cfg': {'num_threads', 'device', 'ddp_cfg', 'fsdp', 'fsdp_cfg', 'tf32', 'cudnn_benchmark', 'compile',
                'peak_tflops'},
    'synthetic_data': None,
    'work_dir': None,
    'load_from': None,
    'resume': None,
}


class ValueRule(NamedTuple):
    """What a setting accepts: values of ``types``, at least ``minimum`` (when given), or None where ``optional``."""
    types: tuple[type, ...]
    minimum: float | None = None
    optional: bool = False


_INT, _NUMBER, _BOOL, _STR = (int,), (int, float), (bool,), (str,)
_TYPE_NAMES = {_INT: 'an int', _NUMBER: 'a number', _BOOL: 'a bool (True or False)', _STR: 'a str'}

# dotted key -> rule; 'tasks.*' stands for every task
VALUE_RULES: dict[str, ValueRule] = {
    'train_cfg.max_iters': ValueRule(_INT, 1),
    'train_cfg.val_interval': ValueRule(_INT, 1),
    'train_cfg.accumulate_steps': ValueRule(_INT, 1),
    'train_cfg.max_nonfinite_steps': ValueRule(_INT, 1),
    'train_cfg.val_at_start': ValueRule(_BOOL),
    'train_cfg.skip_bad_samples': ValueRule(_BOOL),
    'checkpoint_cfg.interval': ValueRule(_INT, 1),
    'checkpoint_cfg.max_keep': ValueRule(_INT, 0, optional=True),  # 0 or None: keep every checkpoint
    'checkpoint_cfg.save_last': ValueRule(_BOOL),
    'log_cfg.interval': ValueRule(_INT, 1),
    'log_cfg.tensorboard': ValueRule(_BOOL),
    'log_cfg.visualize': ValueRule(_BOOL),
    'tasks.*.batch_size': ValueRule(_INT, 1),
    'tasks.*.val_batch_size': ValueRule(_INT, 1),
    'tasks.*.num_workers': ValueRule(_INT, 0),
    'tasks.*.loss_weight': ValueRule(_NUMBER, 0),
    'optim_wrapper.clip_grad.max_norm': ValueRule(_NUMBER, 0),
    'randomness.seed': ValueRule(_INT, 0),
    'randomness.deterministic': ValueRule(_BOOL),
    'env_cfg.num_threads': ValueRule(_INT, 1, optional=True),
    'env_cfg.device': ValueRule(_STR),
    'env_cfg.peak_tflops': ValueRule(_NUMBER, 0, optional=True),
    'env_cfg.fsdp': ValueRule(_BOOL),
    'ema_cfg.decay': ValueRule(_NUMBER, 0),
}


class ConfigError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def check_config(cfg: Mapping) -> None:
    """Raise ConfigError naming the first unknown key."""
    for key, value in cfg.items():
        if key.startswith('_'):
            continue
        if key not in SCHEMA:
            raise ConfigError(f'unknown config key {key!r}; known keys: {sorted(SCHEMA)}')
        allowed = SCHEMA[key]
        if allowed is not None and isinstance(value, Mapping):
            for sub_key in value:
                if sub_key not in allowed:
                    raise ConfigError(f'unknown config key {key}.{sub_key!r}; known keys of {key}: {sorted(allowed)}')
    for name, task in cfg.get('tasks', {}).items():
        if not isinstance(task, Mapping):
            raise ConfigError(f'tasks.{name} must be a dict, got {type(task).__name__}')
        for sub_key in task:
            if sub_key not in TASK_KEYS:
                raise ConfigError(f'unknown config key tasks.{name}.{sub_key!r}; known task keys: {sorted(TASK_KEYS)}')
        group = task.get('group')
        for required in ('type', 'head') + (() if group else ('train_dataset', 'batch_size')):
            if required not in task:
                raise ConfigError(f'tasks.{name} needs {required!r}')
        if group is not None:
            if group not in (cfg.get('task_groups') or {}):
                raise ConfigError(f'tasks.{name}.group={group!r} names no group of task_groups '
                                  f'{sorted(cfg.get("task_groups") or {})}')
            owned = [key for key in ('train_dataset', 'batch_size', 'num_workers') if key in task]
            if owned:
                raise ConfigError(f'tasks.{name} is in group {group!r}, which draws its training batches: remove '
                                  f'tasks.{name}.{owned[0]} (task_groups.{group} sets it)')
    _check_groups(cfg)
    check_values(cfg)


def _check_groups(cfg: Mapping) -> None:
    groups = cfg.get('task_groups') or {}
    members = {name: [task for task, task_cfg in cfg.get('tasks', {}).items() if task_cfg.get('group') == name]
               for name in groups}
    for name, group in groups.items():
        if not isinstance(group, Mapping):
            raise ConfigError(f'task_groups.{name} must be a dict, got {type(group).__name__}')
        unknown = sorted(set(group) - GROUP_KEYS)
        if unknown:
            raise ConfigError(f'unknown config key task_groups.{name}.{unknown[0]!r}; known keys: {sorted(GROUP_KEYS)}')
        for required in ('train_dataset', 'batch_size'):
            if required not in group:
                raise ConfigError(f'task_groups.{name} needs {required!r}')
        if name in cfg.get('tasks', {}):
            raise ConfigError(f'task_groups.{name}: a task has that name too; name the group differently')
        if not members[name]:
            raise ConfigError(f'task_groups.{name} has no task: set tasks.<name>.group={name!r} on its tasks')


def _has_type(value, types: tuple[type, ...]) -> bool:
    # bool is a subclass of int, but True is no count
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _set_values(cfg: Mapping, dotted: str, prefix: str = ''):
    """``(key, value)`` of every value at ``dotted`` (``*`` matches each key of a dict) that the config sets."""
    head, _, rest = dotted.partition('.')
    names = list(cfg) if head == '*' else [head] if head in cfg else []
    for name in names:
        key, value = f'{prefix}{name}', cfg[name]
        if not rest:
            yield key, value
        elif isinstance(value, Mapping):
            yield from _set_values(value, rest, f'{key}.')


def check_values(cfg: Mapping) -> None:
    """Raise ConfigError naming the first setting of :data:`VALUE_RULES` whose value has the wrong type or range,
    e.g. ``tasks.cls.batch_size must be an int, got '16' (str)``."""
    for dotted, rule in VALUE_RULES.items():
        for key, value in _set_values(cfg, dotted):
            if value is None and rule.optional:
                continue
            if not _has_type(value, rule.types):
                raise ConfigError(f'{key} must be {_TYPE_NAMES[rule.types]}{" or None" if rule.optional else ""}, '
                                  f'got {value!r} ({type(value).__name__})')
            if rule.minimum is not None and value < rule.minimum:
                raise ConfigError(f'{key} must be at least {rule.minimum}, got {value!r}')


def load_config(path: str, cfg_options: Mapping | None = None) -> Config:
    """Read ``path`` (with its ``_base_`` files), apply ``--cfg-options`` overrides, check every key."""
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    check_config(cfg)
    return cfg


def to_plain(value):
    """mmengine ConfigDict / tuples to plain dicts and lists (what registries and torch.save expect)."""
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return type(value)(to_plain(v) for v in value) if isinstance(value, tuple) else [to_plain(v) for v in value]
    return value
