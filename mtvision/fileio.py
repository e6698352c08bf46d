"""Files, written so that a crash leaves nothing half-written, and read so that nothing stored in them runs.

Writing: :func:`write_text_atomic` and :func:`save_weights_file` write under a temporary name, flush to disk and
rename over the target, so readers see the old file or the new one. :func:`save_weights_file` writes safetensors
whose bytes depend on the tensors and metadata alone (hash-named zoo files rely on it).

Reading: ``.safetensors`` files hold tensors and a JSON header only. ``.pth`` / ``.pt`` / ``.bin`` files are pickles,
and unpickling can call any importable function: they are read only with ``torch.load(weights_only=True)``, whose
unpickler accepts tensors, plain containers and an allowlist of torch types. A file whose pickle names anything else
(an ``argparse.Namespace`` of training arguments, a numpy scalar, or a function planted to run on load) is refused
before it is unpickled, with an error listing those globals.

This module is the bottom layer of mtvision's file handling: checkpoints (:mod:`mtvision.checkpoint`), the zoo
and the tools build on it, and it imports nothing of mtvision.
"""
import json
import os
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

__all__ = ['PICKLE_SUFFIXES', 'UnsafeCheckpointError', 'WRAPPER_KEYS', 'fsync_write', 'load_pickle',
           'load_weights_file', 'read_file_metadata', 'save_weights_file', 'write_text_atomic']

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


_SAFETENSORS_DTYPES = {torch.float64: 'F64', torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16',
                       torch.int64: 'I64', torch.int32: 'I32', torch.int16: 'I16', torch.int8: 'I8',
                       torch.uint8: 'U8', torch.bool: 'BOOL', torch.float8_e4m3fn: 'F8_E4M3',
                       torch.float8_e5m2: 'F8_E5M2', torch.uint16: 'U16', torch.uint32: 'U32', torch.uint64: 'U64'}


def save_weights_file(path: str | Path, weights: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
                      ) -> None:
    """Write ``weights`` and ``metadata`` (strings) as a safetensors file whose bytes depend on them alone.

    safetensors' own writer keeps the metadata in a hash map, so equal weights and metadata give files whose
    header, and SHA-256, vary from run to run. Here the header is JSON with sorted metadata keys and the tensors
    in a fixed order (larger elements first, as safetensors orders them so every tensor stays aligned, then by
    name), padded with spaces to a multiple of 8 bytes. The file is written under a temporary name, flushed and
    renamed, with the mode ``open()`` gives (0666 less the umask) like every other file mtvision writes.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    if not all(isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()):
        raise TypeError(f'{path}: safetensors metadata must map strings to strings, got {metadata!r}')
    for name, tensor in weights.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f'{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store')
    header: dict = {'__metadata__': dict(sorted(metadata.items()))} if metadata else {}
    buffers, offset = [], 0
    for name in sorted(weights, key=lambda name: (-weights[name].element_size(), name)):
        tensor = weights[name].detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        if sys.byteorder == 'big':  # the format is little-endian
            data = data.reshape(-1, tensor.element_size())[:, ::-1]
        buffers.append(data.tobytes())
        header[name] = dict(dtype=_SAFETENSORS_DTYPES[tensor.dtype], shape=list(tensor.shape),
                            data_offsets=[offset, offset + len(buffers[-1])])
        offset += len(buffers[-1])
    header_bytes = json.dumps(header, separators=(',', ':'), ensure_ascii=False).encode()
    header_bytes += b' ' * (-len(header_bytes) % 8)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        fsync_write(tmp, lambda f: f.writelines([len(header_bytes).to_bytes(8, 'little'), header_bytes, *buffers]))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    ``{'model': {'state_dict': ...}}``), as :func:`mtvision.checkpoint.read_weights` does for one level.

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


def read_file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a ``.safetensors`` file ({} when it has none)."""
    with safe_open(Path(path), framework='pt') as f:
        return dict(f.metadata() or {})
