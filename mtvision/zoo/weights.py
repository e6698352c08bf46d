"""Reading model weights from a file without ever running code stored in it.

``.safetensors`` files hold tensors and a JSON header only. ``.pth`` / ``.pt`` / ``.bin`` files are pickles, and
unpickling can call any importable function: they are read only with ``torch.load(weights_only=True)``, whose
unpickler accepts tensors, plain containers and an allowlist of torch types. A file whose pickle names anything else
(an ``argparse.Namespace`` of training arguments, a numpy scalar, or a function planted to run on load) is refused
before it is unpickled, with an error listing those globals.
"""
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

__all__ = ['PICKLE_SUFFIXES', 'UnsafeCheckpointError', 'WRAPPER_KEYS', 'load_pickle', 'load_weights_file']

PICKLE_SUFFIXES = ('.pth', '.pt', '.bin')
# Training scripts save {'model': ..., 'optimizer': ..., 'epoch': ...} (DeiT, MAE) or {'state_dict': ...} (Lightning,
# mmengine); the weights are the dict under one of these keys.
WRAPPER_KEYS = ('state_dict', 'model')


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickled checkpoint needs globals outside torch's ``weights_only`` allowlist.

    ``globals`` lists them as ``'module.name'`` (empty when torch could not name them). Subclasses
    ``pickle.UnpicklingError``, what ``torch.load(weights_only=True)`` itself raises.
    """

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.globals = names


def load_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict in a ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file, on the CPU.

    Pickled files are read with ``torch.load(weights_only=True)`` only. Before that, their pickle is disassembled
    (``torch.serialization.get_unsafe_globals_in_checkpoint``, a static scan that runs nothing) and a file naming
    globals outside the allowlist is refused with an error listing all of them. Globals the caller trusts can be
    allowed around the call: ``with torch.serialization.safe_globals([argparse.Namespace]): load_weights_file(p)``.
    Files in the pre-1.6 (non-zip) ``torch.save`` format cannot be scanned; ``torch.load(weights_only=True)`` then
    refuses them at the first unsafe global, still without running it.

    A pickled dict holding a dict under ``'state_dict'`` or ``'model'`` is unwrapped (repeatedly, for
    ``{'model': {'state_dict': ...}}``), as :func:`mtvision.engine.checkpoint.read_weights` does for one level.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unsupported suffix, or a state dict with non-string keys or non-tensor values (named).
        UnsafeCheckpointError: a pickle that ``weights_only`` loading refuses (the globals named where known).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != '.safetensors' and suffix not in PICKLE_SUFFIXES:
        raise ValueError(f'{path}: unsupported weights file suffix {path.suffix!r}; expected .safetensors or one '
                         f'of {PICKLE_SUFFIXES}')
    if not path.is_file():
        raise FileNotFoundError(f'no weights file at {path}')
    if suffix == '.safetensors':
        return load_file(path, device='cpu')
    state = load_pickle(path)
    while isinstance(state, Mapping):
        inner = next((state[key] for key in WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise ValueError(f'{path} holds a {type(state).__name__}, not a state dict')
    bad = [f'{key!r}: {type(value).__name__}' for key, value in state.items()
           if not isinstance(key, str) or not isinstance(value, Tensor)]
    if bad:
        shown = ', '.join(bad[:10]) + (f' and {len(bad) - 10} more' if len(bad) > 10 else '')
        raise ValueError(f'{path} is not a state dict of tensors (after unwrapping {WRAPPER_KEYS}): {shown}')
    return dict(state)


def load_pickle(path: str | os.PathLike):
    """What ``torch.save`` wrote to ``path``, read with ``weights_only=True`` after the static scan described in
    :func:`load_weights_file` (same refusal, same ``safe_globals`` escape hatch); on the CPU.

    Raises:
        UnsafeCheckpointError: the pickle needs globals outside the allowlist (named where known); it was not run.
    """
    path = Path(path)
    try:
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except ValueError:  # not a zip checkpoint: the weights-only unpickler below still refuses what it must
        unsafe = []
    if unsafe:
        raise UnsafeCheckpointError(_refusal(path, unsafe), unsafe)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        # the static scan misses globals pushed dynamically and cannot read the legacy format; torch names the
        # first global it blocked ("... unsupported GLOBAL posix.system ...")
        named = sorted(set(re.findall(r'GLOBAL ([\w.]+)', str(error))))
        raise UnsafeCheckpointError(_refusal(path, named), named) from error


def _refusal(path: Path, names: list[str]) -> str:
    what = f'needs globals outside the weights_only allowlist: {names}' if names else \
        'cannot be read by the weights_only unpickler (see the error above)'
    return (f'{path} {what}. Its pickle was not run. Only if you trust where the file comes from, allow exactly '
            f'these with torch.serialization.safe_globals([...]) around the call, or convert its weights to '
            f'.safetensors.')
