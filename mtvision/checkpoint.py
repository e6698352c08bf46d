"""Atomic, pickle-free checkpoints.

A checkpoint is a directory ``iter_<N>/`` with ``model.safetensors`` (the weights) and ``training_state.pth``
(optimizer, step, mixer and data positions, RNG states, config as JSON text: tensors and plain Python values only,
so ``torch.load(weights_only=True)`` reads it). It is written under a temporary name and renamed into place, then the
``last_checkpoint`` pointer is replaced, so a crash at any moment leaves the previous checkpoint and pointer intact.

A sharded run (FSDP) writes no file that holds the whole model: each shard of the ranks' parameters, and of their
optimizer state, goes to its own file, ``model-<i>-of-<n>.safetensors`` and ``optimizer-<i>-of-<n>.safetensors``,
written by the rank that holds it (:func:`write_shard`). Reading such a checkpoint puts the shards back together
(:func:`read_weights`), so tools and ``--load-from`` see the same weights as from ``model.safetensors``.

A checkpoint may come from someone else, so reading one runs none of its contents: the training state is unpickled
with ``weights_only=True`` after a scan for unsafe globals, and the stored config is parsed as data
(:func:`read_stored_config`), never executed as the Python of a config file.
"""
import ast
import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config
from torch.distributed.tensor import DTensor, Replicate, Shard
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from mtvision.registry import AGGREGATORS, DATASETS, METRICS, MODELS, check_stored
from mtvision.fileio import (PICKLE_SUFFIXES, fsync_write, load_pickle, load_weights_file, read_file_metadata,
                             save_weights_file, write_text_atomic)

logger = logging.getLogger(__name__)

WEIGHTS_FILE = 'model.safetensors'
STATE_FILE = 'training_state.pth'
POINTER_FILE = 'last_checkpoint'
EMA_FILE = 'ema.safetensors'


def save_checkpoint(work_dir: str | Path, step: int, model: nn.Module | Mapping[str, torch.Tensor],
                    training_state: dict, max_keep: int | None = None, metadata: dict[str, str] | None = None,
                    ema_model: nn.Module | None = None) -> Path:
    """Write ``iter_<step>/`` atomically, point ``last_checkpoint`` at it, and keep the newest ``max_keep``.

    ``model`` is the module, or its (full) state dict. (A sharded run writes its shards with :func:`write_shard`
    between :func:`new_checkpoint_folder` and :func:`finish_checkpoint`.)

    ``metadata`` (strings) goes into the safetensors header, e.g. the backbone config, so that the weights file
    alone says how to build the model it belongs to. ``ema_model`` (an exponential moving average of ``model``)
    goes to ``ema.safetensors`` beside ``model.safetensors``, with the same names, so either file loads the model.
    """
    tmp = new_checkpoint_folder(work_dir, step)
    try:
        state = model.state_dict() if isinstance(model, nn.Module) else model
        weights = {name: tensor.detach().contiguous() for name, tensor in state.items()}
        save_weights_file(tmp / WEIGHTS_FILE, weights, checkpoint_header(step, metadata))
        if ema_model is not None:
            ema_weights = {name: tensor.detach().contiguous() for name, tensor in ema_model.state_dict().items()}
            save_weights_file(tmp / EMA_FILE, ema_weights, dict(checkpoint_header(step, metadata), ema='true'))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_checkpoint(work_dir, step, tmp, training_state, max_keep)


def checkpoint_header(step: int, metadata: dict[str, str] | None = None) -> dict[str, str]:
    return {'step': str(step), 'format': 'mtvision', **(metadata or {})}


def new_checkpoint_folder(work_dir: str | Path, step: int) -> Path:
    """The empty temporary folder a checkpoint of ``step`` is written into before :func:`finish_checkpoint`."""
    tmp = Path(work_dir) / f'.iter_{step}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(work_dir: str | Path, step: int, tmp: Path, training_state: dict,
                      max_keep: int | None = None) -> Path:
    """Write the training state into ``tmp`` (which holds the weights), rename it to ``iter_<step>/``, point
    ``last_checkpoint`` at it and keep the newest ``max_keep``; ``tmp`` is removed when any of it fails."""
    work_dir = Path(work_dir)
    final = work_dir / f'iter_{step}'
    try:
        fsync_write(tmp / STATE_FILE, lambda f: torch.save(training_state, f))
        if final.exists():  # saving the same step again: move the old one aside only once the new one is complete
            stale = work_dir / f'.iter_{step}.stale-{os.getpid()}'
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(work_dir / POINTER_FILE, final.name)
    if max_keep:
        kept = sorted(work_dir.glob('iter_*'), key=lambda p: int(p.name.split('_')[1]))
        for old in kept[:-max_keep]:
            if old != final:
                shutil.rmtree(old)
    return final


def remove_partial_checkpoints(work_dir: str | Path) -> list[Path]:
    """Delete what interrupted checkpoint writes left in ``work_dir`` (``.iter_*.tmp-*`` / ``.stale-*`` folders,
    ``.last_checkpoint.tmp-*``): never a complete checkpoint, which only a rename creates. Call it only while no
    other process writes checkpoints there. Returns what was removed."""
    leftovers = sorted(Path(work_dir).glob('.iter_*.tmp-*')) + sorted(Path(work_dir).glob('.iter_*.stale-*')) + \
        sorted(Path(work_dir).glob(f'.{POINTER_FILE}.tmp-*'))
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


def find_last_checkpoint(work_dir: str | Path) -> Path | None:
    """The checkpoint named by ``work_dir/last_checkpoint``, or None when there is none."""
    pointer = Path(work_dir) / POINTER_FILE
    if not pointer.is_file():
        return None
    checkpoint = Path(work_dir) / pointer.read_text().strip()
    if not (checkpoint / STATE_FILE).is_file():
        raise FileNotFoundError(f'{pointer} names {checkpoint}, which holds no {STATE_FILE}')
    return checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from itself, a work dir (its last checkpoint) or a file inside one."""
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS_FILE, STATE_FILE):
        path = path.parent
    if (path / POINTER_FILE).is_file():
        return find_last_checkpoint(path)
    if (path / WEIGHTS_FILE).is_file() or _shard_files(path, 'model'):
        return path
    raise FileNotFoundError(f'{path} is neither a checkpoint directory (with {WEIGHTS_FILE}) nor a work dir '
                            f'with a {POINTER_FILE} file')


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint directory, a work dir, a ``.safetensors`` file or a ``.pth`` state dict.

    Weights files are read by :func:`mtvision.fileio.load_weights_file`: a ``.pth`` that needs globals beyond plain
    tensors and containers is refused with their names, and its pickle never runs.
    """
    path = Path(path)
    if path.suffix == '.safetensors' or (path.suffix in PICKLE_SUFFIXES and path.name != STATE_FILE):
        return load_weights_file(path)
    checkpoint = resolve_checkpoint(path)
    if not (checkpoint / WEIGHTS_FILE).is_file():
        return read_shards(checkpoint, 'model')
    return load_file(checkpoint / WEIGHTS_FILE)


def _shard_name(prefix: str, index: int, count: int) -> str:
    return f'{prefix}-{index + 1:05d}-of-{count:05d}.safetensors'


def _shard_files(folder: Path, prefix: str) -> list[Path]:
    return sorted(folder.glob(f'{prefix}-*-of-*.safetensors')) if folder.is_dir() else []


def local_shard(state: Mapping[str, torch.Tensor]) -> tuple[int, int, bool]:
    """Where this rank's part of a sharded (FSDP2) state dict lies: ``(shard index, shard count, writes)``. The
    DTensors are sharded on dim 0 over one mesh dimension and replicated over any other (HSDP); of the ranks that
    hold the same shard only the first writes it. Without DTensors the state is whole on every rank: rank 0
    writes it as the one shard."""
    layouts = [(t.device_mesh, t.placements) for t in state.values() if isinstance(t, DTensor)]
    if not layouts:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return 0, 1, rank == 0
    mesh, placements = layouts[0]
    if any(layout != layouts[0] for layout in layouts):
        raise ValueError('a sharded checkpoint needs every DTensor on the same mesh with the same placements')
    shard_dims = [dim for dim, placement in enumerate(placements) if placement == Shard(0)]
    if len(shard_dims) != 1 or any(p != Replicate() for dim, p in enumerate(placements) if dim != shard_dims[0]):
        raise ValueError(f'a sharded checkpoint supports Shard(0) on one mesh dimension (and Replicate on the '
                         f'others), got {placements}')
    index, count = mesh.get_local_rank(shard_dims[0]), mesh.size(shard_dims[0])
    writes = all(mesh.get_local_rank(dim) == 0 for dim in range(mesh.ndim) if dim != shard_dims[0])
    return index, count, writes


def write_shard(folder: Path, prefix: str, state: Mapping[str, torch.Tensor],
                metadata: dict[str, str] | None = None) -> Path | None:
    """Write this rank's shard of ``state`` (a sharded state dict: DTensors, and whole tensors every rank holds
    alike) to ``folder/<prefix>-<i>-of-<n>.safetensors``, the whole tensors in the first shard only; the header
    records the full shape of each sharded tensor. Returns the file, or None on a rank that holds a copy of a
    shard another rank writes. Nothing is gathered: each rank writes what it holds."""
    index, count, writes = local_shard(state)
    if not writes:
        return None
    tensors, shapes = {}, {}
    for name, tensor in state.items():
        if isinstance(tensor, DTensor):
            tensors[name] = tensor.to_local().detach().contiguous().cpu()
            shapes[name] = list(tensor.shape)
        elif index == 0:
            tensors[name] = tensor.detach().contiguous().cpu()
    path = folder / _shard_name(prefix, index, count)
    save_weights_file(path, tensors, {**(metadata or {}), 'sharded_shapes': json.dumps(shapes)})
    return path


def read_shards(folder: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The whole state written as shards by :func:`write_shard`: each sharded tensor's shards concatenated on dim
    0 in shard order and checked against its recorded shape. A missing or extra shard is an error naming it."""
    folder = Path(folder)
    files = _shard_files(folder, prefix)
    if not files:
        raise FileNotFoundError(f'{folder} holds neither {WEIGHTS_FILE} nor {prefix}-*-of-*.safetensors shards')
    count = int(files[0].stem.rsplit('-of-', 1)[1])
    expected = [folder / _shard_name(prefix, index, count) for index in range(count)]
    if files != expected:
        missing = sorted(str(p.name) for p in set(expected) - set(files))
        extra = sorted(str(p.name) for p in set(files) - set(expected))
        raise FileNotFoundError(f'{folder}: the shards of {prefix} are incomplete; missing {missing}, unexpected '
                                f'{extra}')
    parts, shapes = [], None
    for path in expected:
        with safe_open(path, framework='pt') as f:
            recorded = json.loads((f.metadata() or {}).get('sharded_shapes', 'null'))
        if recorded is None or (shapes is not None and recorded != shapes):
            raise ValueError(f'{path}: its header does not record the same sharded tensors as the other shards')
        shapes = recorded
        parts.append(load_file(path))
    state = dict(parts[0])
    for name, shape in shapes.items():
        pieces = [part.get(name) for part in parts]
        if any(piece is None for piece in pieces):
            raise ValueError(f'{folder}: {name} is missing from shard {pieces.index(None) + 1} of {prefix}')
        state[name] = torch.cat(pieces)
        if list(state[name].shape) != shape:
            raise ValueError(f'{folder}: the shards of {name} make {list(state[name].shape)}, recorded {shape}')
    return state


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a weights file, checkpoint directory or work dir ({} for .pth files)."""
    path = Path(path)
    if path.suffix != '.safetensors':
        if path.suffix in ('.pth', '.pt', '.bin'):
            return {}
        checkpoint = resolve_checkpoint(path)
        path = checkpoint / WEIGHTS_FILE if (checkpoint / WEIGHTS_FILE).is_file() else \
            _shard_files(checkpoint, 'model')[0]
    return read_file_metadata(path)


def load_weights(model: nn.Module, source: str | Path | Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Load weights (a path for :func:`read_weights`, or a state dict) into ``model``.

    Mismatched names or shapes are an error that lists them.
    """
    weights = dict(source) if isinstance(source, Mapping) else read_weights(source)
    where = 'the given weights' if isinstance(source, Mapping) else f'checkpoint {source}'
    own = model.state_dict()
    wrong_shape = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                   for k, v in weights.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    problems = wrong_shape + ([f'missing in checkpoint: {missing[:10]}'] if missing and strict else []) + (
        [f'not in the model: {unexpected[:10]}'] if unexpected and strict else [])
    if problems:
        raise RuntimeError(f'{where} does not match the model:\n  ' + '\n  '.join(problems))
    model.load_state_dict(weights, strict=strict)


def load_training_state(checkpoint: str | Path) -> dict:
    """The training state of a checkpoint (or work dir), read as :func:`mtvision.fileio.load_weights_file` reads
    pickles: one that needs globals beyond tensors and plain values is refused (``UnsafeCheckpointError``, the
    globals named) before it is unpickled."""
    return load_pickle(resolve_checkpoint(checkpoint) / STATE_FILE)


def config_to_json(cfg: Config) -> str:
    """``cfg`` as the text a checkpoint stores: JSON, which :func:`read_stored_config` reads back as data."""
    return json.dumps(cfg.to_dict())


def read_stored_config(checkpoint: str | Path) -> Config:
    """The config a checkpoint (or work dir's last checkpoint) was trained with, as data checked for building.

    The text is JSON (:func:`config_to_json`) or, in older checkpoints, mmengine's ``pretty_text``, which is parsed
    (:func:`parse_stored_config`), not run. The parts that tools build from it (the model, each task's head,
    datasets and metric, the aggregator) pass :func:`mtvision.registry.check_stored`: only names mtvision registers
    and timm model names, and no argument that loads pretrained weights (the weights are the checkpoint's).

    Raises:
        ValueError: naming the training state file and what in its config was refused.
        UnsafeCheckpointError: a training state whose pickle needs unsafe globals.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    source = checkpoint / STATE_FILE
    text = load_training_state(checkpoint).get('config')
    if not isinstance(text, str):
        raise ValueError(f'{source} holds no config text')
    return Config(_checked_for_building(parse_stored_config(text, source), source))


def _checked_for_building(cfg: dict, source: Path) -> dict:
    cfg = dict(cfg)
    if 'model' in cfg:
        cfg['model'] = check_stored(MODELS, {'type': 'MultiTaskModel', **cfg['model']}, source, 'model')
    if cfg.get('aggregator') is not None:
        cfg['aggregator'] = check_stored(AGGREGATORS, cfg['aggregator'], source, 'aggregator')
    tasks = cfg.get('tasks') or {}
    if not isinstance(tasks, Mapping) or not all(isinstance(task, Mapping) for task in tasks.values()):
        raise ValueError(f'{source}: the stored config\'s tasks are not a dict of dicts')
    parts = dict(head=MODELS, train_dataset=DATASETS, val_dataset=DATASETS, metric=METRICS)
    cfg['tasks'] = {name: {key: check_stored(parts[key], value, source, f'tasks.{name}.{key}')
                           if key in parts and value else value for key, value in task.items()}
                    for name, task in tasks.items()}
    return cfg


def parse_stored_config(text: str, source: str | Path) -> dict:
    """The config dict in a checkpoint's config text, read as data: JSON, or the Python that mmengine's
    ``Config.pretty_text`` writes, limited to ``name = value`` statements whose values are literals, lists, tuples,
    dicts, ``dict(key=value, ...)`` calls and signed numbers.

    Raises:
        ValueError: naming ``source``, the line and the construct that is not data (a call of anything but
            ``dict``, a name, an attribute, an import, a comprehension, an f-string...). Nothing in the text ran.
    """
    if text.lstrip().startswith('{'):
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f'{source}: the stored config is not valid JSON ({error})') from None
        if not isinstance(cfg, dict):
            raise ValueError(f'{source}: the stored config is not a JSON object')
        return _check_keys(cfg, source)
    try:
        module = ast.parse(text, filename=str(source))
    except SyntaxError as error:
        raise ValueError(f'{source}: the stored config is neither JSON nor Python ({error})') from None
    cfg = {}
    for statement in module.body:
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            _not_data(statement, source)
        cfg[statement.targets[0].id] = _literal(statement.value, source)
    return _check_keys(cfg, source)


def _check_keys(cfg: dict, source) -> dict:
    # the config is written out again as Python (Config.pretty_text, e.g. the config file extract_task_model.py
    # writes), which puts top-level keys in as `key = ...` and other keys as '{key}' unescaped: a key that is not a
    # plain name there would be code
    def walk(value, where: str):
        if isinstance(value, dict):
            for key, item in value.items():
                if not (isinstance(key, str) and key.isprintable() and not any(c in key for c in '\'"\\')):
                    raise ValueError(f'{source}: the stored config has the key {key!r} in {where}, which is not a '
                                     f'plain name')
                walk(item, f'{where}.{key}')
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f'{where}[{index}]')

    for key, value in cfg.items():
        if not key.isidentifier():
            raise ValueError(f'{source}: the stored config has the top-level key {key!r}, which is not a name')
        walk(value, key)
    return cfg


def _literal(node: ast.expr, source):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) and \
            isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(item, source) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict) and None not in node.keys:  # a None key is ** unpacking
        return {_literal(key, source): _literal(value, source) for key, value in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict' and not node.args \
            and all(keyword.arg is not None for keyword in node.keywords):
        return {keyword.arg: _literal(keyword.value, source) for keyword in node.keywords}
    _not_data(node, source)


def _not_data(node: ast.AST, source):
    code = ast.unparse(node)
    code = code if len(code) <= 100 else code[:97] + '...'
    raise ValueError(f'{source}: line {node.lineno}: `{code}` ({type(node).__name__}) is not data. A stored config '
                     f'holds only `name = value` statements of literals, lists, tuples, dicts and dict(...) calls; '
                     f'it was not run')


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain values (no pickled objects); with CUDA, also the
    generator of this process's current CUDA device (dropout, masks and augmentations drawn on the GPU)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = dict(torch=torch.get_rng_state(),
                 numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), position=int(position),
                            has_gauss=int(has_gauss), cached_gauss=float(cached_gauss)),
                 python=dict(version=version, state=list(python_state), gauss_next=gauss_next))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    numpy_state = state['numpy']
    np.random.set_state((numpy_state['kind'], numpy_state['keys'].numpy().astype(np.uint32),
                         numpy_state['position'], numpy_state['has_gauss'], numpy_state['cached_gauss']))
    python_state = state['python']
    random.setstate((python_state['version'], tuple(python_state['state']), python_state['gauss_next']))
    if state.get('cuda') is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state['cuda'])
        else:
            logger.warning('the checkpoint holds a CUDA random state and this run has no CUDA device: random draws '
                           'on the device will differ from the uninterrupted run')
