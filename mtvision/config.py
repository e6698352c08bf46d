"""Configs: mmengine's text style (``_base_`` inheritance, ``--cfg-options``), checked against a schema.

Top-level names starting with ``_`` are the config file's own variables (paths, pipelines shared by several
entries) and are not checked. Every other key must be known: a typo is an error naming the key, not a setting
that silently does nothing. Keys of registered components (``type=...``) are checked when the component is built.
"""
from collections.abc import Mapping, Sequence

from mmengine.config import Config

TASK_KEYS = {'type', 'head', 'train_dataset', 'val_dataset', 'batch_size', 'val_batch_size', 'num_workers',
             'loss_weight', 'metric'}

# key -> the keys allowed inside it (None: any value, checked where it is used)
SCHEMA: dict[str, set[str] | None] = {
    'model': {'type', 'backbone', 'moe_loss_weights'},
    'tasks': None,  # task name -> TASK_KEYS, checked in check_config
    'mixer': {'strategy', 'seed', 'tasks_per_step', 'temperature', 'stages'},
    'aggregator': None,
    'optim_wrapper': {'type', 'optimizer', 'clip_grad', 'dtype', 'loss_scale'},
    'param_scheduler': None,
    'train_cfg': {'max_iters', 'val_interval', 'val_at_start', 'accumulate_steps', 'max_nonfinite_steps',
                  'skip_bad_samples'},
    'checkpoint_cfg': {'interval', 'max_keep', 'save_last'},
    'log_cfg': {'interval', 'tensorboard', 'visualize'},
    'randomness': {'seed', 'deterministic'},
    'ema_cfg': {'decay', 'evaluate'},
    'env_cfg': {'num_threads', 'device', 'fsdp'},
    'synthetic_data': None,
    'work_dir': None,
    'load_from': None,
    'resume': None,
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
        for required in ('type', 'head', 'train_dataset', 'batch_size'):
            if required not in task:
                raise ConfigError(f'tasks.{name} needs {required!r}')


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
