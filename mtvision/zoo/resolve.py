"""What a model or weights argument names, resolved the one way every entry point resolves it: ``get_model(...,
pretrained=SPEC)``, :func:`mtvision.zoo.load_model`, ``tools/train.py --load-from`` / ``--resume``,
``tools/test.py``, ``tools/predict.py`` and the probes' ``MODEL``.

A spec is tried as, in this order:

1. ``timm:<name>`` or ``timm:<name>@<file>``: a timm architecture, with random weights or the weights of a local file
   in timm's layout (nothing is downloaded from the timm hub: its files carry no hash to verify);
2. a URL (``http(s)://``, ``file://``, ``hf://``): downloaded, verified and cached by :func:`mtvision.zoo.download`,
   against the SHA-256 of the zoo entry whose URL it is, else the one in its file name (``<stem>-<hex>.<ext>``, at
   least 8 digits, torch.hub's convention); a URL with neither is refused;
3. an existing path: a work dir (its last checkpoint), a checkpoint directory (or a file inside one), or a
   ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` weights file (pickles read weights-only);
4. a model zoo name (:func:`mtvision.zoo.list_models`): its published weights, fetched and verified as in 2.

A path wins over a zoo name spelled the same. Anything else is an error naming what the spec is not, with the zoo
names close to it. How the weights then load into a model (a whole model, a backbone, timm's layout converted) is
:func:`mtvision.zoo.convert.load_state`'s business: every entry point loads through :func:`load_pretrained`.
"""
import difflib
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mtvision.checkpoint import (POINTER_FILE, STATE_FILE, WEIGHTS_FILE, find_last_checkpoint, read_weights,
                                 resolve_checkpoint)
from mtvision.fileio import PICKLE_SUFFIXES
from mtvision.zoo.convert import load_state
from mtvision.zoo.fetch import SCHEMES, download
from mtvision.zoo.metafile import ModelEntry, load_zoo

__all__ = ['Resolved', 'load_pretrained', 'resolve', 'resume_checkpoint', 'training_checkpoint', 'zoo_weights']

logger = logging.getLogger(__name__)

# torch.hub's check_hash convention: the hex digits after the last '-' of the file name's stem
_NAME_HASH = re.compile(r'-([0-9a-f]{8,64})$')
WEIGHTS_SUFFIXES = ('.safetensors', *PICKLE_SUFFIXES)
KINDS = ('timm', 'url', 'work_dir', 'checkpoint', 'file', 'zoo')


@dataclass(frozen=True)
class Resolved:
    """What a spec names. ``path`` is local (downloaded first for URLs and zoo names): a weights file or a checkpoint
    directory (a work dir resolves to its last checkpoint); None for ``timm:<name>`` without a file."""
    spec: str
    kind: str  # one of KINDS
    path: Path | None
    entry: ModelEntry | None = None  # the zoo entry, for zoo names and their URLs
    timm_name: str | None = None

    @property
    def is_checkpoint(self) -> bool:
        """A checkpoint directory, which also holds the training state and the config it was trained with."""
        return self.kind in ('work_dir', 'checkpoint')

    def read_weights(self) -> dict:
        if self.path is None:
            raise ValueError(f'{self.spec!r} names a timm architecture with random weights, so there are no weights '
                             f'to load: give a weights file as timm:{self.timm_name}@<file>')
        return read_weights(self.path)


def resolve(spec: str | os.PathLike | Resolved, *, root: str | os.PathLike | None = None,
            cache_dir: str | os.PathLike | None = None) -> Resolved:
    """What ``spec`` names (see the module docstring), fetched when it is remote.

    Args:
        root: the zoo root for names (default: the zoo that ships with mtvision plus ``MTVISION_ZOO``'s).
        cache_dir: the download cache root (see :func:`mtvision.zoo.get_cache_dir`).

    Raises:
        FileNotFoundError: a spec that is none of the four (close zoo names listed), a missing ``timm:`` file, or a
            folder that is no checkpoint or work dir.
        ValueError: an unsupported file suffix, a URL whose hash cannot be known, a zoo recipe (no weights).
        mtvision.zoo.ChecksumError: downloaded bytes that are not the expected ones.
    """
    if isinstance(spec, Resolved):
        return spec
    text = os.fspath(spec)
    if text.startswith('timm:'):
        name, _, weights_file = text[len('timm:'):].partition('@')
        if not name:
            raise ValueError(f'{text!r}: no timm model name after timm:')
        if weights_file and not Path(weights_file).expanduser().is_file():
            raise FileNotFoundError(f'{text!r}: no weights file {weights_file!r}')
        return Resolved(text, 'timm', Path(weights_file).expanduser() if weights_file else None, timm_name=name)
    if urllib.parse.urlsplit(text).scheme.lower() in SCHEMES:
        entry = next((e for e in load_zoo(root).models.values() if e.weights == text and e.sha256), None)
        return Resolved(text, 'url', _download_url(text, entry, cache_dir), entry)
    path = Path(text).expanduser()
    if path.is_file() and path.name in (WEIGHTS_FILE, STATE_FILE) and (path.parent / STATE_FILE).is_file():
        path = path.parent  # a file inside a checkpoint names the checkpoint
    if path.is_dir():
        kind = 'work_dir' if (path / POINTER_FILE).is_file() else 'checkpoint'
        return Resolved(text, kind, resolve_checkpoint(path))
    if path.is_file():
        if path.suffix.lower() not in WEIGHTS_SUFFIXES:
            raise ValueError(f'{text!r}: unsupported weights file suffix {path.suffix!r}; expected one of '
                             f'{WEIGHTS_SUFFIXES}')
        return Resolved(text, 'file', path)
    zoo = load_zoo(root)
    if text in zoo.models:
        return Resolved(text, 'zoo', zoo_weights(zoo.models[text], cache_dir), zoo.models[text])
    close = difflib.get_close_matches(text, list(zoo.models), n=5, cutoff=0.6)
    hint = f'; close zoo names: {close}' if close else ''
    raise FileNotFoundError(f'{text!r} is not a file or directory, a URL, timm:<name>[@<file>], nor a model zoo name '
                            f'(mtvision.list_models()){hint}')


def zoo_weights(entry: ModelEntry, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local copy of a zoo entry's published weights: downloaded, verified against its ``SHA256``, cached."""
    if entry.is_recipe:
        raise ValueError(f'model {entry.name!r} is a recipe without published weights: train it with '
                         f'`python tools/train.py {entry.config}` and pass the work dir instead')
    if entry.sha256 is None:
        raise ValueError(f'model {entry.name!r}: no SHA-256 is recorded for its upstream weights {entry.weights}, so '
                         f'they cannot be verified here. Fetch the file yourself, check it, and pass its path, or '
                         f'download it with mtvision.zoo.download(url, sha256) when you know the hash')
    return download(entry.weights, entry.sha256, cache_dir=cache_dir)


def _download_url(url: str, entry: ModelEntry | None, cache_dir) -> Path:
    if entry is not None:
        return download(url, entry.sha256, cache_dir=cache_dir)
    stem = urllib.parse.unquote(urllib.parse.urlsplit(url).path).rpartition('/')[2].partition('.')[0]
    match = _NAME_HASH.search(stem)
    if match is None:
        raise ValueError(f'{url!r}: cannot verify a URL whose file name carries no SHA-256 prefix (<stem>-<at least '
                         f'8 hex digits>.<ext>) and that is no zoo entry\'s; download it with mtvision.zoo.download('
                         f'url, sha256) and pass the local path')
    return download(url, match.group(1), cache_dir=cache_dir)


def load_pretrained(model: nn.Module, spec: str | os.PathLike | Resolved, **resolve_options) -> str:
    """Load the weights ``spec`` names into a ``MultiTaskModel`` (:func:`mtvision.zoo.convert.load_state`: a whole
    model, a backbone, or timm's layout converted into the backbone); returns what was loaded, for the log."""
    resolved = resolve(spec, **resolve_options)
    return load_state(model, resolved.read_weights())


def resume_checkpoint(spec: str | os.PathLike | None, work_dir: str | os.PathLike | None = None) -> Path | None:
    """The checkpoint ``--resume SPEC`` resumes from: ``'auto'`` is ``work_dir``'s last one (None when it has none
    yet), else ``spec`` must resolve to a checkpoint directory or work dir (resuming needs the optimizer, data
    positions and RNG states that only a checkpoint holds)."""
    if spec is None:
        return None
    if spec == 'auto':
        return find_last_checkpoint(work_dir) if work_dir is not None else None
    return training_checkpoint(spec, 'resume from', hint=f'. To start from its weights, use --load-from {spec}')


def training_checkpoint(spec: str | os.PathLike, purpose: str = 'use', hint: str = '') -> Path:
    """The checkpoint directory ``spec`` resolves to, for what needs more than weights (the training state, the
    config it was trained with); anything else is a ``ValueError`` saying what ``spec`` names instead."""
    resolved = resolve(spec)
    if not resolved.is_checkpoint:
        raise ValueError(f'cannot {purpose} {resolved.spec!r}: it names {_DESCRIPTIONS[resolved.kind]}, without the '
                         f'training state and config that only a checkpoint directory or work dir holds{hint}')
    return resolved.path


_DESCRIPTIONS = dict(timm='a timm architecture', url='a downloaded weights file', file='a weights file',
                     zoo="a model zoo entry's published weights")
