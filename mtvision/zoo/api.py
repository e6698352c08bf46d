"""Named models of the zoo: ``list_models`` and ``get_model`` (mmpretrain's ``mmpretrain.apis`` and timm's
``create_model`` conventions).

A name is a ``Models`` entry of a ``configs/*/metafile.yml`` of the zoo that ships with mtvision, or of a metafile
in a user zoo folder named by ``MTVISION_ZOO`` (:mod:`mtvision.zoo.metafile`). ``get_model`` builds
the entry's config without any dataset (heads only need their class counts, which the config holds) and loads the
weights asked for. Published weights are fetched by :func:`mtvision.zoo.download`, so ``MTVISION_MIRROR``,
``MTVISION_OFFLINE`` and ``MTVISION_HOME`` apply, and are checked against the entry's ``SHA256``.
"""
import fnmatch
import logging
import os

from mmengine.config import Config

from mtvision.zoo.metafile import ModelEntry, load_zoo
from mtvision.zoo.resolve import Resolved, load_pretrained, resolve, zoo_weights

__all__ = ['get_model', 'list_models', 'load_model']

logger = logging.getLogger(__name__)


def list_models(pattern: str = '*', pretrained: bool = False, *, root: str | os.PathLike | None = None) -> list[str]:
    """Sorted names of the zoo's models matching the shell-style ``pattern`` (``fnmatch``, case-sensitive).

    Args:
        pattern: e.g. ``'*vit-tiny*'``.
        pretrained: only entries with published weights (recipes left out).
        root: the zoo root (a folder holding ``configs/*/metafile.yml``); default: the zoo that ships with
            mtvision plus the user zoos of ``MTVISION_ZOO``.
    """
    models = load_zoo(root).models.values()
    return sorted(entry.name for entry in models
                  if fnmatch.fnmatchcase(entry.name, pattern) and not (pretrained and entry.is_recipe))


def get_model(name: str | ModelEntry, pretrained: bool | str | os.PathLike = False, *,
              root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
              **overrides):
    """The :class:`~mtvision.models.MultiTaskModel` of a zoo entry, built from its config.

    The model is returned as built, in training mode (as ``torch.nn`` modules and timm's ``create_model`` are):
    call ``.eval()`` for inference.

    Args:
        name: a model name (see :func:`list_models`), or a :class:`ModelEntry`.
        pretrained: ``False``: initial weights. ``True``: the entry's published weights, downloaded, verified
            against its ``SHA256`` and cached (an upstream entry without a recorded hash is refused: pass the file
            you fetched and checked instead). An upstream entry's weights (``Weights Format: timm``) are converted
            into the backbone; its heads keep their initial weights. A URL (``http(s)://``, ``file://``,
            ``hf://``): weights downloaded from there; the entry's ``SHA256`` verifies them when the URL is the
            entry's own, else the hash in the file name (``<stem>-<hex>.<ext>``, at least 8 digits) does, and a URL
            with neither is refused. A local path: a ``.safetensors`` / ``.pth`` weights file, a checkpoint
            directory or a work dir (for an upstream entry, a file in timm's layout is converted as above).
        root: the zoo root for a name (default: the zoo that ships with mtvision plus the user zoos of
            ``MTVISION_ZOO``).
        cache_dir: the download cache root (see :func:`mtvision.zoo.get_cache_dir`).
        **overrides: model config keys, nested as mmpretrain's ``get_model`` takes them (``backbone=dict(
            drop_path_rate=0.1)`` merges into ``model.backbone``), or dotted config keys as ``--cfg-options``
            takes them (``**{'model.backbone.drop_path_rate': 0.1}``).

    The model carries ``cfg`` (its config, overrides applied) and ``data_config``: per task, what its inputs must
    look like, read from the validation pipeline as timm's ``pretrained_cfg`` holds it (``mean``, ``std`` on the
    0..1 scale, ``input_size`` ``(3, H, W)``, ``interpolation``, ``crop_pct``; None where the pipeline does not
    say) and the ``classes`` its dataset config lists.

    Raises:
        KeyError: an unknown name (the message lists close matches).
        ValueError: ``pretrained=True`` for a recipe, or a URL whose hash cannot be known.
        mtvision.zoo.ChecksumError: downloaded weights whose SHA-256 is not the expected one.
        RuntimeError: weights that do not fit the built model (the keys named).
    """
    from mtvision.config import load_config

    entry = name if isinstance(name, ModelEntry) else _entry(name, root)
    if pretrained is True or (isinstance(pretrained, str) and pretrained == entry.weights):
        weights = Resolved(entry.name, 'zoo', zoo_weights(entry, cache_dir), entry)
    elif pretrained is False or pretrained is None:
        weights = None
    elif isinstance(pretrained, (str, os.PathLike)):
        weights = resolve(pretrained, root=root, cache_dir=cache_dir)
    else:
        raise TypeError(f'pretrained must be a bool, a URL or a path, got {type(pretrained).__name__}')
    return _build(load_config(str(entry.config_path), dotted_overrides(overrides)), weights, entry.name)


def load_model(spec: str | os.PathLike, *, config: str | os.PathLike | None = None,
               root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, **overrides):
    """The :class:`~mtvision.models.MultiTaskModel` that ``spec`` names, with its weights, in training mode, carrying
    ``cfg`` and ``data_config`` as :func:`get_model`'s models do.

    ``spec`` is anything :func:`mtvision.zoo.resolve.resolve` takes. The architecture comes from ``config`` (a
    config file: Python the caller chose to run) when given; else from the zoo entry of a name, or from the config a
    checkpoint directory or work dir stores (read as data, never run). A weights file or URL holds no config, and
    ``timm:`` names a backbone only: those need ``config``. ``overrides`` as :func:`get_model` takes them.

    Raises:
        ValueError: a spec that holds no config and no ``config`` given; what :func:`resolve` raises.
    """
    from mtvision.checkpoint import read_stored_config
    from mtvision.config import load_config

    resolved = resolve(spec, root=root, cache_dir=cache_dir)
    if config is not None:
        cfg = load_config(os.fspath(config), dotted_overrides(overrides))
    elif resolved.entry is not None:
        cfg = load_config(str(resolved.entry.config_path), dotted_overrides(overrides))
    elif resolved.is_checkpoint:
        cfg = read_stored_config(resolved.path)
        cfg.merge_from_dict(dotted_overrides(overrides))
    else:
        raise ValueError(f'{resolved.spec!r} holds weights but no model config: pass config= (--config), the '
                         f'training config they come from')
    return _build(cfg, resolved, resolved.spec)


def _build(cfg: Config, weights: Resolved | None, name: str):
    """The config's model (no datasets built: heads only need the class counts the config holds), carrying ``cfg``
    and ``data_config``, with ``weights`` loaded."""
    from mtvision.models import build_model
    from mtvision.tasks import build_tasks

    model = build_model(cfg, build_tasks(cfg.tasks, train=False, val=False))
    model.cfg = cfg
    model.data_config = {task: data_config(task_cfg) for task, task_cfg in cfg.to_dict()['tasks'].items()}
    if weights is not None:
        logger.info('%s: loaded %s: %s', name, weights.path, load_pretrained(model, weights))
    return model


def dotted_overrides(overrides: dict) -> dict:
    """``get_model``'s keyword overrides as ``--cfg-options`` keys: a dotted key as it is, any other a key of
    ``model``, nested dicts flattened so that they merge into the config rather than replace it."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f'{prefix}.{key}', item)
        else:
            flat[prefix] = value
    for key, value in overrides.items():
        if '.' in key:
            flat[key] = value
        else:
            walk(f'model.{key}', value)
    return flat


def data_config(task_cfg: dict) -> dict:
    """What a task's inputs must look like, from its validation pipeline (the training one when it has none):
    timm's ``pretrained_cfg`` keys and the dataset config's ``classes``."""
    from mtvision.tasks import normalize_stats

    dataset = task_cfg.get('val_dataset') or task_cfg.get('train_dataset') or {}
    pipeline = [step for step in dataset.get('pipeline', []) if isinstance(step, dict)]
    mean, std = normalize_stats(pipeline)
    if max(mean) > 1:  # statistics given on the 0..255 scale
        mean, std = tuple(m / 255 for m in mean), tuple(s / 255 for s in std)
    config = dict(mean=tuple(mean), std=tuple(std), input_size=None, interpolation=None, crop_pct=None,
                  classes=dataset.get('classes'))
    for step in pipeline:
        size = step.get('size')
        if step.get('type') in ('Resize', 'ResizeCenterCrop', 'CenterCrop', 'RandomResizedCrop') and size:
            size = [size] if isinstance(size, int) else list(size)
            config['input_size'] = (3, size[0], size[-1])  # one number: a square
        if step.get('type') == 'ResizeCenterCrop':
            config['crop_pct'] = step.get('crop_pct', 0.875)
            config['interpolation'] = step.get('interpolation', 'bicubic')
        elif step.get('type') == 'Resize' and config['interpolation'] is None:
            config['interpolation'] = step.get('interpolation', 'bilinear')
    return config


def _entry(name: str, root) -> ModelEntry:
    zoo = load_zoo(root)
    if name not in zoo.models:
        import difflib
        close = difflib.get_close_matches(name, list(zoo.models), n=5, cutoff=0.4)
        hint = f'; did you mean {close}?' if close else f'; known models: {sorted(zoo.models)}'
        where = ' and '.join(map(str, [zoo.root, *zoo.user_zoos]))
        raise KeyError(f'no model named {name!r} in the zoo at {where}{hint}')
    return zoo.models[name]
