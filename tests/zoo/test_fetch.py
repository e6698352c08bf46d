import hashlib
import random
import re
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mtvision.zoo import ChecksumError, DownloadError, download

# the package exports the function `download`, which hides the submodule of the same name from attribute access
from mtvision.zoo import fetch as download_module

DATA = random.Random(0).randbytes(200_000)
DATA_SHA = hashlib.sha256(DATA).hexdigest()
CUT = 70_001  # where an interrupted response stops: mid-chunk, so resuming must start at an odd byte


class FileServer:
    """A local HTTP server of in-memory files that records every request and can cut responses short.

    ``cuts``: for each coming request in turn, how many body bytes to send before closing the connection
    (``None``: all). ``ranges``: honour ``Range: bytes=N-`` requests with 206 responses.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []  # path, Range header and body bytes sent, per request
        self.cuts: list[int | None] = []
        self.ranges = False
        self.slow = False
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with server.lock:
                    record = dict(path=self.path, range=self.headers.get('Range'), sent=0)
                    server.requests.append(record)
                    cut = server.cuts.pop(0) if server.cuts else None
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or '')
                if server.ranges and match:
                    start = int(match.group(1))
                payload = body[start:]
                self.send_response(206 if start else 200)
                if server.ranges:
                    self.send_header('Accept-Ranges', 'bytes')
                if start:
                    self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
                self.send_header('Content-Length', str(len(payload)))
                self.end_headers()
                out = payload[:cut] if cut is not None else payload
                step = len(out) // 8 + 1 if server.slow else len(out) or 1
                for i in range(0, len(out), step):  # slow: in pieces, so concurrent clients interleave
                    self.wfile.write(out[i:i + step])
                    if server.slow:
                        threading.Event().wait(0.005)
                record['sent'] = len(out)

        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.base = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def add(self, path: str, data: bytes = DATA) -> str:
        self.files[path] = data
        return self.base + path


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for var in ('MTVISION_HOME', 'MTVISION_OFFLINE', 'MTVISION_MIRROR'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(download_module, 'RETRY_BACKOFF_S', 0.0)
    monkeypatch.setattr(download_module, 'CHUNK_SIZE', 16 * 1024)  # several chunks per file


def checkpoints(cache: Path) -> list[str]:
    folder = cache / 'checkpoints'
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_http_download_is_verified_and_cached(server, tmp_path):
    url = server.add('/releases/v1/vit.pth')
    path = download(url, DATA_SHA, cache_dir=tmp_path, progress=False)
    assert path == tmp_path / 'checkpoints' / 'vit.pth'
    assert path.read_bytes() == DATA
    assert checkpoints(tmp_path) == ['vit.pth']  # no temporary file left
    assert download(url, DATA_SHA, cache_dir=tmp_path, progress=False) == path
    assert len(server.requests) == 1  # the second call read the cache only


def test_cache_root_from_environment_and_filename(server, tmp_path, monkeypatch):
    monkeypatch.setenv('MTVISION_HOME', str(tmp_path / 'home'))
    path = download(server.add('/a/weights.bin'), DATA_SHA, filename='renamed.bin', progress=False)
    assert path == tmp_path / 'home' / 'checkpoints' / 'renamed.bin'
    assert path.read_bytes() == DATA


def test_sha256_prefix_and_malformed_hashes(server, tmp_path):
    url = server.add('/w.pth')
    assert download(url, DATA_SHA[:8].upper(), cache_dir=tmp_path, progress=False).read_bytes() == DATA
    for bad in (DATA_SHA[:7], 'g' * 64, DATA_SHA + '0'):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            download(url, bad, cache_dir=tmp_path, progress=False)


def test_file_url(tmp_path):
    source = tmp_path / 'src dir' / 'model.safetensors'
    source.parent.mkdir()
    source.write_bytes(DATA)
    path = download(source.as_uri(), DATA_SHA, cache_dir=tmp_path / 'cache', progress=False)
    assert path == tmp_path / 'cache' / 'checkpoints' / 'model.safetensors'
    assert path.read_bytes() == DATA
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        download((tmp_path / 'missing.pth').as_uri(), DATA_SHA, cache_dir=tmp_path / 'cache', progress=False)


@pytest.mark.parametrize('scheme', ['http', 'file'])
def test_wrong_hash_leaves_no_file(server, tmp_path, scheme):
    if scheme == 'http':
        url = server.add('/w.pth')
    else:
        (tmp_path / 'w.pth').write_bytes(DATA)
        url = (tmp_path / 'w.pth').as_uri()
    wrong = hashlib.sha256(DATA + b'x').hexdigest()
    with pytest.raises(ChecksumError) as info:
        download(url, wrong, cache_dir=tmp_path / 'cache', progress=False)
    assert url in str(info.value) and wrong in str(info.value) and DATA_SHA in str(info.value)
    assert checkpoints(tmp_path / 'cache') == []


def test_corrupt_cached_file_is_downloaded_again(server, tmp_path):
    (tmp_path / 'checkpoints').mkdir()
    (tmp_path / 'checkpoints' / 'w.pth').write_bytes(DATA[:-1] + b'\0')
    path = download(server.add('/w.pth'), DATA_SHA, cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == DATA and len(server.requests) == 1


def test_retry_restarts_when_server_ignores_range(server, tmp_path):
    url = server.add('/w.pth')
    server.cuts = [CUT]
    path = download(url, DATA_SHA, cache_dir=tmp_path, progress=False, retries=2)
    assert path.read_bytes() == DATA
    assert [r['range'] for r in server.requests] == [None, f'bytes={CUT}-']
    assert [r['sent'] for r in server.requests] == [CUT, len(DATA)]  # a 200 answer: the whole file again
    assert checkpoints(tmp_path) == ['w.pth']


def test_retry_resumes_with_range(server, tmp_path):
    url = server.add('/w.pth')
    server.ranges = True
    server.cuts = [CUT, CUT]  # two interruptions: the second resume starts after both parts
    path = download(url, DATA_SHA, cache_dir=tmp_path, progress=False, retries=2)
    assert path.read_bytes() == DATA
    assert [r['range'] for r in server.requests] == [None, f'bytes={CUT}-', f'bytes={2 * CUT}-']
    assert [r['sent'] for r in server.requests] == [CUT, CUT, len(DATA) - 2 * CUT]


def test_retries_exhausted_and_http_errors(server, tmp_path):
    url = server.add('/w.pth')
    server.cuts = [CUT, 10, 10]
    server.ranges = True
    with pytest.raises(DownloadError, match=r'3 attempts failed'):
        download(url, DATA_SHA, cache_dir=tmp_path, progress=False, retries=2)
    assert len(server.requests) == 3
    assert checkpoints(tmp_path) == []  # the partial file is gone too
    with pytest.raises(DownloadError, match=r'/missing\.pth: HTTP 404'):
        download(server.base + '/missing.pth', DATA_SHA, cache_dir=tmp_path, progress=False)
    assert len(server.requests) == 4  # a 404 is not retried


def test_offline_mode(server, tmp_path, monkeypatch):
    url = server.add('/w.pth')
    with pytest.raises(FileNotFoundError) as info:
        download(url, DATA_SHA, cache_dir=tmp_path, progress=False, offline=True)
    assert str(tmp_path / 'checkpoints' / 'w.pth') in str(info.value) and url in str(info.value)
    monkeypatch.setenv('MTVISION_OFFLINE', '1')
    with pytest.raises(FileNotFoundError, match='MTVISION_OFFLINE=1'):
        download(url, DATA_SHA, cache_dir=tmp_path, progress=False)
    assert server.requests == [] and checkpoints(tmp_path) == []
    path = download(url, DATA_SHA, cache_dir=tmp_path, progress=False, offline=False)  # the argument wins
    assert path.read_bytes() == DATA and len(server.requests) == 1
    assert download(url, DATA_SHA, cache_dir=tmp_path, progress=False) == path
    assert len(server.requests) == 1
    monkeypatch.setenv('MTVISION_OFFLINE', 'maybe')
    with pytest.raises(ValueError, match="MTVISION_OFFLINE='maybe'"):
        download(url, DATA_SHA[:8], cache_dir=tmp_path / 'other', progress=False)


def test_mirror_http(server, tmp_path, monkeypatch):
    server.add('/mirror/releases/v1/w.pth')
    monkeypatch.setenv('MTVISION_MIRROR', server.base + '/mirror/')
    path = download('https://models.example.invalid/releases/v1/w.pth', DATA_SHA, cache_dir=tmp_path,
                    progress=False)
    assert path.read_bytes() == DATA
    assert [r['path'] for r in server.requests] == ['/mirror/releases/v1/w.pth']


def test_mirror_file(tmp_path, monkeypatch):
    local = tmp_path / 'mirror' / 'releases' / 'v1' / 'w.pth'
    local.parent.mkdir(parents=True)
    local.write_bytes(DATA)
    monkeypatch.setenv('MTVISION_MIRROR', (tmp_path / 'mirror').as_uri())
    path = download('https://models.example.invalid/releases/v1/w.pth?raw=1', DATA_SHA,
                    cache_dir=tmp_path / 'cache', progress=False)
    assert path.read_bytes() == DATA
    monkeypatch.setenv('MTVISION_MIRROR', 'ftp://mirror')
    with pytest.raises(ValueError, match='MTVISION_MIRROR'):
        download('https://models.example.invalid/x.pth', DATA_SHA, cache_dir=tmp_path / 'cache', progress=False)


def test_concurrent_downloads_of_one_file(server, tmp_path):
    url = server.add('/w.pth')
    server.slow = True
    results, errors = [], []

    def fetch():
        try:
            results.append(download(url, DATA_SHA, cache_dir=tmp_path, progress=False))
        except Exception as error:  # re-raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(server.requests) >= 2  # they did overlap: several streamed at once
    assert set(results) == {tmp_path / 'checkpoints' / 'w.pth'}
    assert results[0].read_bytes() == DATA and checkpoints(tmp_path) == ['w.pth']


def test_hugging_face_source(tmp_path, monkeypatch):
    blob = tmp_path / 'hub' / 'blob'
    blob.parent.mkdir()
    blob.write_bytes(DATA)
    calls = []

    def hf_hub_download(repo_id, filename, revision=None):
        calls.append((repo_id, filename, revision))
        return str(blob)

    monkeypatch.setitem(sys.modules, 'huggingface_hub', types.SimpleNamespace(hf_hub_download=hf_hub_download))
    url = 'hf://timm/vit_tiny@v2/sub/model.safetensors'
    path = download(url, DATA_SHA, cache_dir=tmp_path / 'cache', progress=False)
    assert calls == [('timm/vit_tiny', 'sub/model.safetensors', 'v2')]
    assert path.name == 'timm--vit_tiny--sub--model.safetensors' and path.read_bytes() == DATA
    with pytest.raises(ChecksumError, match=re.escape(url)):
        download(url, DATA_SHA[::-1], filename='other.safetensors', cache_dir=tmp_path / 'cache', progress=False)
    assert checkpoints(tmp_path / 'cache') == ['timm--vit_tiny--sub--model.safetensors']
    assert blob.read_bytes() == DATA  # the Hub's copy is untouched

    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)  # makes the import fail
    with pytest.raises(ImportError, match='install huggingface_hub'):
        download(url, DATA_SHA, filename='x.safetensors', cache_dir=tmp_path / 'cache', progress=False)


@pytest.mark.parametrize('url, filename, message', [
    ('ftp://host/w.pth', None, "unsupported URL 'ftp://host/w.pth'"),
    ('https://host/models/', None, 'pass filename='),
    ('https://host/w.pth', '../w.pth', "filename '../w.pth'"),
    ('hf://timm/model.safetensors', None, 'malformed Hugging Face URL'),
])
def test_bad_arguments(tmp_path, url, filename, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        download(url, DATA_SHA, filename=filename, cache_dir=tmp_path, progress=False)
