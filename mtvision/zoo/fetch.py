"""Verified, cached downloads of model files.

``download(url, sha256)`` returns the path of a local file whose SHA-256 matches ``sha256``: the cached copy when
there is one, else a fresh one fetched, verified and moved into the cache in one atomic rename, so the cache only
ever holds complete, verified files.

Cache layout: ``<root>/checkpoints/<filename>``, where ``root`` is the ``cache_dir`` argument, else
``$MTVISION_HOME``, else ``<torch.hub.get_dir()>/mtvision`` (``~/.cache/torch/hub/mtvision`` by default).

Sources:
    ``http://`` / ``https://``: streamed with urllib; interrupted transfers are retried and, where the server honours
        HTTP ``Range`` requests, resumed from the bytes already received.
    ``file://``: a local file, copied (and hashed) like a download.
    ``hf://<owner>/<repo>[@<revision>]/<path in repo>``: a Hugging Face Hub file, fetched by
        ``huggingface_hub.hf_hub_download`` (optional dependency; its own cache, token and ``HF_ENDPOINT`` apply),
        then verified and linked (or copied) into this cache. Its default cache name is
        ``<owner>--<repo>--<path with '/' replaced by '--'>``: Hub files are mostly called ``model.safetensors``, and
        a bare basename would make every Hub model share one cache entry.

Environment:
    ``MTVISION_HOME``: the cache root (see above).
    ``MTVISION_OFFLINE``: ``1``/``true``/``yes``/``on`` (any case) to use the cache only; ``0``/``false``/``no``/
        ``off`` or empty for the default. The ``offline`` argument, when given, wins.
    ``MTVISION_MIRROR``: a base URL (``http(s)://`` or ``file://``, possibly with a path) that replaces the scheme and
        host (with port) of every ``http(s)://`` URL; the URL's whole path (and, for an ``http(s)`` mirror, its query)
        is appended to it. With ``MTVISION_MIRROR=http://mirror.lan/models``,
        ``https://example.com/releases/v1/vit.pth`` is fetched from ``http://mirror.lan/models/releases/v1/vit.pth``;
        with ``file:///srv/models`` from ``/srv/models/releases/v1/vit.pth``. ``hf://`` URLs are not mirrored (use
        ``HF_ENDPOINT``); the cache name and error messages keep the original URL.

Concurrency: every download streams into its own temporary file (``.<filename>.<pid>-<thread>.part``, in the cache
folder so the final rename never crosses file systems) and is renamed over the target with ``os.replace``: processes
downloading the same file at once each write their own copy and the last rename wins, with identical, verified
content; a reader never sees a partial file. Any failure removes the temporary file; only a killed process can leave
one behind.
"""
import hashlib
import http.client
import logging
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

import mtvision

__all__ = ['ChecksumError', 'DownloadError', 'download', 'get_cache_dir']

logger = logging.getLogger(__name__)

ENV_HOME = 'MTVISION_HOME'
ENV_OFFLINE = 'MTVISION_OFFLINE'
ENV_MIRROR = 'MTVISION_MIRROR'

CHUNK_SIZE = 1 << 20
TIMEOUT_S = 60.0  # per socket operation, not per download
RETRY_BACKOFF_S = 1.0  # the first retry waits this long, each further one twice as long (capped at 30 s)

SCHEMES = ('http', 'https', 'file', 'hf')
# Worth retrying: time-outs, rate limits and server-side failures; any other 4xx would fail the same way again.
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRUE = ('1', 'true', 'yes', 'on')
_FALSE = ('', '0', 'false', 'no', 'off')
_HEX = re.compile(r'[0-9a-f]+')
_MIN_HASH_PREFIX = 8


class DownloadError(RuntimeError):
    """A file could not be fetched: an HTTP error, or a transfer that kept failing after every retry."""


class ChecksumError(DownloadError):
    """A file's SHA-256 is not the expected one. The message names the URL and both hashes."""


class _Incomplete(Exception):
    """A transfer that ended early (or whose range was refused); worth another attempt."""


_RETRYABLE = (_Incomplete, urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def get_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$MTVISION_HOME``, else ``<torch.hub.get_dir()>/mtvision``.

    Downloaded files live in its ``checkpoints/`` folder.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_HOME) or Path(torch.hub.get_dir()) / 'mtvision'
    return Path(cache_dir).expanduser()


def download(url: str, sha256: str, filename: str | None = None, cache_dir: str | os.PathLike | None = None,
             progress: bool = True, retries: int = 3, offline: bool | None = None) -> Path:
    """The cached path of the file at ``url``, downloaded and verified if it is not cached yet.

    Args:
        url: ``http(s)://``, ``file://`` or ``hf://<owner>/<repo>[@<revision>]/<path>`` (see the module docstring).
        sha256: the file's SHA-256 in hex: the full 64 digits, or a prefix of at least 8 (as timm and
            ``torch.hub`` accept in file names). A prefix of ``n`` digits checks ``4 n`` bits: enough to catch a
            corrupt or wrong file, not to resist a forged one; give the full hash where that matters.
        filename: the name in the cache; default: the last component of the URL path.
        cache_dir: the cache root (see :func:`get_cache_dir`).
        progress: show a tqdm progress bar while downloading.
        retries: how many times an interrupted ``http(s)`` transfer is retried (so at most ``retries + 1``
            requests), with a backoff of ``RETRY_BACKOFF_S`` doubled each time.
        offline: use the cache only; ``None`` reads ``$MTVISION_OFFLINE``.

    Returns:
        ``<cache root>/checkpoints/<filename>``. A cached file is hashed on every call (a read of the file, no
        network): one that does not match is downloaded again and replaced.

    Raises:
        ValueError: a malformed ``sha256``, ``url``, ``filename`` or environment value.
        FileNotFoundError: offline, and the file is not cached (the message names the cache path and the URL), or a
            ``file://`` URL naming no file.
        ChecksumError: the downloaded (or, offline, the cached) file has another hash; a downloaded file is deleted.
        DownloadError: an HTTP error, or a transfer that failed ``retries + 1`` times.
        ImportError: an ``hf://`` URL without ``huggingface_hub`` installed.
    """
    expected = _check_sha256(sha256)
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f'retries must be an int >= 0, got {retries!r}')
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f'unsupported URL {url!r}: the scheme must be one of {SCHEMES}')
    name = _default_filename(url, scheme) if filename is None else filename
    _check_filename(name, url)
    target = get_cache_dir(cache_dir) / 'checkpoints' / name

    cached_hash = _sha256_of(target) if target.is_file() else None
    if cached_hash is not None and cached_hash.startswith(expected):
        return target
    if offline is None:
        offline, reason = _env_flag(ENV_OFFLINE), f'{ENV_OFFLINE}={os.environ.get(ENV_OFFLINE)}'
    else:
        reason = f'offline={offline}'
    if offline:
        if cached_hash is not None:
            raise ChecksumError(f'offline mode ({reason}): the cached {target} has SHA-256 {cached_hash}, expected '
                                f'{expected}; fetch a fresh copy from {url}')
        raise FileNotFoundError(f'offline mode ({reason}): {target} is not in the cache; fetch it from {url} '
                                f'(SHA-256 {expected}) and put it at that path, or turn offline mode off')
    if cached_hash is not None:
        logger.warning('cached %s has SHA-256 %s, expected %s: downloading it again from %s',
                       target, cached_hash, expected, url)

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f'.{name}.{os.getpid()}-{threading.get_ident()}.part')
    source = _mirrored(url) if scheme in ('http', 'https') else url
    try:
        if scheme == 'hf':
            actual = _fetch_hf(url, part)
        elif urllib.parse.urlsplit(source).scheme.lower() == 'file':
            actual = _fetch_file(source, part, progress, name)
        else:
            actual = _fetch_http(source, part, progress, retries, name)
        if not actual.startswith(expected):
            via = f' (via {source})' if source != url else ''
            raise ChecksumError(f'SHA-256 mismatch for {url}{via}: expected {expected}, got {actual}; '
                                f'the downloaded file was deleted')
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)  # a no-op after the rename; removes the partial file after any failure
    return target


def _check_sha256(sha256: str) -> str:
    value = sha256.strip().lower() if isinstance(sha256, str) else sha256
    if not isinstance(value, str) or not _HEX.fullmatch(value) or not _MIN_HASH_PREFIX <= len(value) <= 64:
        raise ValueError(f'sha256 must be a hex SHA-256 digest or a prefix of at least {_MIN_HASH_PREFIX} hex '
                         f'digits, got {sha256!r}')
    return value


def _env_flag(variable: str) -> bool:
    value = os.environ.get(variable, '').strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f'{variable}={os.environ[variable]!r}: expected one of {_TRUE + _FALSE[1:]} (or unset)')


def _parse_hf(url: str) -> tuple[str, str | None, str]:
    """``hf://owner/repo[@revision]/path`` -> (repo id, revision, path in the repo)."""
    parts = url[len('hf://'):].split('/')
    if len(parts) < 3 or not all(parts):
        raise ValueError(f'malformed Hugging Face URL {url!r}: expected hf://<owner>/<repo>[@<revision>]/<path>')
    repo, _, revision = parts[1].partition('@')
    return f'{parts[0]}/{repo}', revision or None, '/'.join(parts[2:])


def _default_filename(url: str, scheme: str) -> str:
    if scheme == 'hf':
        repo_id, _, path = _parse_hf(url)
        return '--'.join([*repo_id.split('/'), *path.split('/')])
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rpartition('/')[2])
    if not name:
        raise ValueError(f'cannot name the cached file after {url!r} (its path has no file name): pass filename=')
    return name


def _check_filename(name: str, url: str) -> None:
    separators = [sep for sep in (os.sep, os.altsep, '/') if sep]
    if not isinstance(name, str) or name in ('', '.', '..') or any(sep in name for sep in separators):
        raise ValueError(f'filename {name!r} (for {url}) must be a plain file name, without a folder')


def _mirrored(url: str) -> str:
    mirror = os.environ.get(ENV_MIRROR, '').strip()
    if not mirror:
        return url
    mirror_scheme = urllib.parse.urlsplit(mirror).scheme.lower()
    if mirror_scheme not in ('http', 'https', 'file'):
        raise ValueError(f'{ENV_MIRROR}={mirror!r}: expected an http://, https:// or file:// base URL')
    parts = urllib.parse.urlsplit(url)
    mirrored = mirror.rstrip('/') + '/' + parts.path.lstrip('/')
    if parts.query and mirror_scheme != 'file':  # a query means nothing to a folder
        mirrored += '?' + parts.query
    return mirrored


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _stream(reader: BinaryIO, part: Path, offset: int, total: int | None, progress: bool, desc: str) -> str:
    """Write ``reader`` to ``part`` after its first ``offset`` bytes (which are kept); the SHA-256 of the result."""
    digest = hashlib.sha256()
    if offset:  # the hash covers the whole file, so the kept bytes are hashed again from disk
        with open(part, 'rb') as f:
            for chunk in iter(lambda: f.read(CHUNK_SIZE), b''):
                digest.update(chunk)
    with open(part, 'ab' if offset else 'wb') as f, \
            tqdm(total=total, initial=offset, unit='B', unit_scale=True, unit_divisor=1024, desc=desc,
                 disable=not progress) as bar:
        while chunk := reader.read(CHUNK_SIZE):
            f.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())  # the rename that follows must not publish a file whose bytes are still in memory
    return digest.hexdigest()


def _fetch_file(url: str, part: Path, progress: bool, desc: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ('', 'localhost'):
        raise ValueError(f'{url!r}: file:// URLs must name a local file (file:///path)')
    source = Path(urllib.request.url2pathname(parts.path))
    if not source.is_file():
        raise FileNotFoundError(f'{url}: there is no file at {source}')
    with open(source, 'rb') as reader:
        return _stream(reader, part, 0, source.stat().st_size, progress, desc)


def _fetch_hf(url: str, part: Path) -> str:
    repo_id, revision, path = _parse_hf(url)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:
        raise ImportError(f'{url} is a Hugging Face Hub file: install huggingface_hub '
                          f'(pip install huggingface_hub) to download it') from error
    source = Path(hf_hub_download(repo_id=repo_id, filename=path, revision=revision)).resolve()
    actual = _sha256_of(source)
    try:  # a hard link shares the Hub cache's bytes instead of storing a second copy
        os.link(source, part)
    except OSError:
        shutil.copyfile(source, part)
    return actual


def _fetch_http(url: str, part: Path, progress: bool, retries: int, desc: str) -> str:
    validator: list[str | None] = [None]  # ETag / Last-Modified of the first response, for If-Range on resumes
    for attempt in range(retries + 1):
        try:
            return _http_attempt(url, part, progress, desc, validator)
        except urllib.error.HTTPError as error:
            if error.code not in _RETRY_STATUS:
                raise DownloadError(f'cannot download {url}: HTTP {error.code} {error.reason}') from error
            last_error: Exception = error
        except _RETRYABLE as error:
            last_error = error
        if attempt < retries:
            delay = min(RETRY_BACKOFF_S * 2 ** attempt, 30.0)
            logger.warning('download of %s interrupted (%s); retry %d of %d in %.1f s',
                           url, last_error, attempt + 1, retries, delay)
            time.sleep(delay)
    raise DownloadError(f'cannot download {url}: {retries + 1} attempts failed, the last with {last_error!r}') \
        from last_error


def _http_attempt(url: str, part: Path, progress: bool, desc: str, validator: list[str | None]) -> str:
    offset = part.stat().st_size if part.exists() else 0
    headers = {'User-Agent': f'mtvision/{mtvision.__version__}'}
    if offset:
        headers['Range'] = f'bytes={offset}-'
        if validator[0]:  # the server sends the whole (new) file instead if it changed since the first attempt
            headers['If-Range'] = validator[0]
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the kept bytes do not fit the file on the server: start over
            part.unlink(missing_ok=True)
            raise _Incomplete(f'{url} refused the range {headers["Range"]}') from error
        raise
    with response:
        if response.status == 206 and _content_range_start(response.headers.get('Content-Range')) != offset:
            part.unlink(missing_ok=True)  # a part of the file that does not continue ours: start over
            raise _Incomplete(f'{url} answered {headers.get("Range")} with {response.headers.get("Content-Range")}')
        if offset and response.status != 206:
            offset = 0  # the server ignored the range and sends the whole file
        etag = response.headers.get('ETag')
        # If-Range needs a strong validator: a weak ETag would make every resume restart
        validator[0] = etag if etag and not etag.startswith('W/') else response.headers.get('Last-Modified')
        length = response.headers.get('Content-Length', '')
        total = offset + int(length) if length.isdigit() else None
        actual = _stream(response, part, offset, total, progress, desc)
    size = part.stat().st_size
    # http.client ends a body cut short by a closed connection silently, so the length is checked here
    if total is not None and size != total:
        raise _Incomplete(f'{url}: the connection closed after {size} of {total} bytes')
    return actual


def _content_range_start(content_range: str | None) -> int | None:
    match = re.fullmatch(r'\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*', content_range or '')
    return int(match.group(1)) if match else None
