"""Atomic, pickle-free checkpoints.

A checkpoint is a directory ``iter_<N>/`` with ``model.safetensors`` (the weights) and ``training_state.pth``
(optimizer, step, mixer and data positions, RNG states, config text: tensors and plain Python values only, so
``torch.load(weights_only=True)`` reads it). It is written under a temporary name and renamed into place, then the
``last_checkpoint`` pointer is replaced, so a crash at any moment leaves the previous checkpoint and pointer intact.
"""
import logging
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mtvision.zoo.weights import PICKLE_SUFFIXES, load_weights_file

logger = logging.getLogger(__name__)

WEIGHTS_FILE = 'model.safetensors'
STATE_FILE = 'training_state.pth'
POINTER_FILE = 'last_checkpoint'
EMA_FILE = 'ema.safetensors'


def fsync_write(path: Path, write) -> None:
    """Call ``write(file)`` and flush the bytes to disk before returning (then renaming the file is durable)."""
    with open(path, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    fsync_write(tmp, lambda f: f.write(text.encode()))
    os.replace(tmp, path)


def save_checkpoint(work_dir: str | Path, step: int, model: nn.Module | Mapping[str, torch.Tensor],
                    training_state: dict, max_keep: int | None = None, metadata: dict[str, str] | None = None,
                    ema_model: nn.Module | None = None) -> Path:
    """Write ``iter_<step>/`` atomically, point ``last_checkpoint`` at it, and keep the newest ``max_keep``.

    ``model`` is the module, or its (full) state dict.

    ``metadata`` (strings) goes into the safetensors header, e.g. the backbone config, so that the weights file
    alone says how to build the model it belongs to. ``ema_model`` (an exponential moving average of ``model``)
    goes to ``ema.safetensors`` beside ``model.safetensors``, with the same names, so either file loads the model.
    """
    work_dir = Path(work_dir)
    final = work_dir / f'iter_{step}'
    tmp = work_dir / f'.iter_{step}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = model.state_dict() if isinstance(model, nn.Module) else model
        weights = {name: tensor.detach().contiguous() for name, tensor in state.items()}
        header = {'step': str(step), 'format': 'mtvision', **(metadata or {})}
        save_file(weights, tmp / WEIGHTS_FILE, metadata=header)
        if ema_model is not None:
            ema_weights = {name: tensor.detach().contiguous() for name, tensor in ema_model.state_dict().items()}
            save_file(ema_weights, tmp / EMA_FILE, metadata=dict(header, ema='true'))
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
    if (path / WEIGHTS_FILE).is_file():
        return path
    raise FileNotFoundError(f'{path} is neither a checkpoint directory (with {WEIGHTS_FILE}) nor a work dir '
                            f'with a {POINTER_FILE} file')


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint directory, a work dir, a ``.safetensors`` file or a ``.pth`` state dict.

    Weights files are read by :func:`mtvision.zoo.load_weights_file`: a ``.pth`` that needs globals beyond plain
    tensors and containers is refused with their names, and its pickle never runs.
    """
    path = Path(path)
    if path.suffix == '.safetensors' or (path.suffix in PICKLE_SUFFIXES and path.name != STATE_FILE):
        return load_weights_file(path)
    return load_file(resolve_checkpoint(path) / WEIGHTS_FILE)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a weights file, checkpoint directory or work dir ({} for .pth files)."""
    path = Path(path)
    if path.suffix != '.safetensors':
        if path.suffix in ('.pth', '.pt', '.bin'):
            return {}
        path = resolve_checkpoint(path) / WEIGHTS_FILE
    with safe_open(path, framework='pt') as f:
        return dict(f.metadata() or {})


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
    return torch.load(resolve_checkpoint(checkpoint) / STATE_FILE, map_location='cpu', weights_only=True)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and plain values (no pickled objects)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return dict(torch=torch.get_rng_state(),
                numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), position=int(position),
                           has_gauss=int(has_gauss), cached_gauss=float(cached_gauss)),
                python=dict(version=version, state=list(python_state), gauss_next=gauss_next))


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    numpy_state = state['numpy']
    np.random.set_state((numpy_state['kind'], numpy_state['keys'].numpy().astype(np.uint32),
                         numpy_state['position'], numpy_state['has_gauss'], numpy_state['cached_gauss']))
    python_state = state['python']
    random.setstate((python_state['version'], tuple(python_state['state']), python_state['gauss_next']))
