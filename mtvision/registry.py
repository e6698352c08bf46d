"""Registries of mtvision's buildable parts.

Configs name a part by ``type='RegisteredName'``; ``REGISTRY.build(cfg)`` turns the dict into the object.
``locations`` lets a registry import the modules that register into it on first use, so importing
``mtvision`` stays cheap (no torch, timm or cv2 until something is built).

A description read from a file that the user did not pass as a config (a checkpoint's stored config, the
``backbone`` header of a weights file) is data from whoever made the file: it is built with
:func:`build_from_stored`, never with ``REGISTRY.build`` directly, because mmengine's registries import any name
they do not know (``type='subprocess.getoutput'`` would run on build).
"""
import logging
from collections.abc import Mapping

from mmengine.registry import Registry

__all__ = ['AGGREGATORS', 'DATASETS', 'METRICS', 'MODELS', 'TASK_TYPES', 'TRANSFORMS', 'WEIGHTS_ARGS',
           'build_from_stored', 'check_stored']

logger = logging.getLogger(__name__)

MODELS = Registry('model', locations=['mtvision.models'])
DATASETS = Registry('dataset', locations=['mtvision.data'])
TRANSFORMS = Registry('transform', locations=['mtvision.data.transforms'])
METRICS = Registry('metric', locations=['mtvision.evaluation'])
AGGREGATORS = Registry('aggregator', locations=['mtvision.optim'])
# what each kind of task (``tasks.<name>.type``) needs of the framework: mtvision.task_types.TaskType subclasses.
# Not in REGISTRIES: a task type is never built from a stored description, only looked up by name.
TASK_TYPES = Registry('task type', locations=['mtvision.task_types'])
REGISTRIES = (MODELS, DATASETS, TRANSFORMS, METRICS, AGGREGATORS)

# arguments that make a backbone (through timm.create_model) read or download weights: a stored description drops
# them, since the weights come from the file being loaded
WEIGHTS_ARGS = ('pretrained', 'pretrained_file', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path')


def _registered(name: str, registry: Registry, nested: bool) -> bool:
    # module_dict only: Registry.get would look in parent / scoped registries and finally import the name
    registries = (registry,) + tuple(r for r in REGISTRIES if r is not registry) if nested else (registry,)
    for candidate in registries:  # a nested part may belong to another registry (a dataset's pipeline steps)
        candidate.import_from_location()
        if name in candidate.module_dict:
            return True
    return False


def _timm_model(name: str) -> bool:
    import timm
    from timm.models import split_model_name_tag

    # 'hf-hub:org/repo' and 'local-dir:' names make timm fetch or read a config: only registered architectures pass
    return ':' not in name and split_model_name_tag(name)[0] in timm.list_models()


def check_stored(registry: Registry, cfg: Mapping, source, where: str | None = None) -> dict:
    """``cfg``, a description read from ``source`` (a file), as a plain dict that is safe to build with ``registry``.

    Every ``type`` (at any depth) must be a name registered in mtvision's own registries (the top one in
    ``registry``), every ``model_name`` a timm architecture (``timm.list_models()``). :data:`WEIGHTS_ARGS` are
    dropped: a stored description never makes a build read or download weights.

    ``where`` names ``cfg`` in messages (default: the registry's name), e.g. ``'tasks.cls.head'``.

    Raises:
        ValueError: naming ``source``, the offending name and where it is in ``cfg``.
    """
    def walk(value, where: str, top: bool = False):
        if isinstance(value, Mapping):
            checked = {}
            for key, item in value.items():
                if key in WEIGHTS_ARGS:
                    if item:
                        logger.info('%s: %s.%s=%r dropped: the weights come from the file', source, where, key, item)
                    continue
                checked[key] = walk(item, f'{where}.{key}')
            if 'type' in checked:
                name = checked['type']
                if not isinstance(name, str) or not _registered(name, registry, nested=not top):
                    kind = f"mtvision's {registry.name} registry" if top else "any of mtvision's registries"
                    raise ValueError(f'{source}: {where}.type={name!r} is not a name registered in {kind}; names '
                                     f'read from a file are never imported, so it was refused')
            if 'model_name' in checked and not (isinstance(checked['model_name'], str)
                                                and _timm_model(checked['model_name'])):
                raise ValueError(f'{source}: {where}.model_name={checked["model_name"]!r} is not a timm model name '
                                 f'(timm.list_models()), so it was refused')
            return checked
        if isinstance(value, (list, tuple)):
            return type(value)(walk(item, f'{where}[{i}]') for i, item in enumerate(value))
        return value

    if not isinstance(cfg, Mapping) or 'type' not in cfg:
        raise ValueError(f'{source}: {where or registry.name} must be a dict with a type, got {cfg!r}')
    return walk(cfg, where or registry.name, top=True)


def build_from_stored(registry: Registry, cfg: Mapping, source, default_args: dict | None = None):
    """``registry.build`` of a description read from ``source``, once :func:`check_stored` has passed it."""
    return registry.build(check_stored(registry, cfg, source), default_args=default_args)
