"""Without --data-dir the PTB files are downloaded once, checked and extracted atomically:
against a real HTTP server on 127.0.0.1 serving tarballs built here from the shared files."""

from __future__ import annotations

import http.server
import io
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from lstm.data import download, ptb
from lstm.errors import UserError
from lstm.tasks.ptb import PTBTask
from lstm.tasks.ptb_config import PTBConfig


def build_tgz(ptb_dir: Path, corrupt: str = "") -> bytes:
    """simple-examples.tgz's layout (./simple-examples/data/ptb.*.txt) from the shared files;
    ``corrupt="content"`` flips one word of the training file, ``"truncated"`` cuts the archive."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split in ptb.SPLITS:
            data = (ptb_dir / f"ptb.{split}.txt").read_bytes()
            if corrupt == "content" and split == "train":
                data = data.replace(b" the ", b" teh ", 1)
            info = tarfile.TarInfo(f"./simple-examples/data/ptb.{split}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    return blob[: len(blob) // 2] if corrupt == "truncated" else blob


@pytest.fixture
def server():
    """A local HTTP server; ``serve(path, body)`` publishes bytes and returns their URL."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def serve(path: str, body: bytes) -> str:
        files[path] = body
        return f"http://127.0.0.1:{httpd.server_address[1]}{path}"

    yield serve
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("LSTM_DATA_DIR", raising=False)
    monkeypatch.setenv("LSTM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_download_checks_and_extracts_into_the_cache(ptb_dir, server, cache, monkeypatch):
    monkeypatch.setenv("LSTM_PTB_URL", server("/simple-examples.tgz", build_tgz(ptb_dir)))
    folder = download.locate("ptb")
    assert folder == cache / "ptb"
    for split in ptb.SPLITS:
        assert (folder / f"ptb.{split}.txt").read_bytes() == (ptb_dir / f"ptb.{split}.txt").read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["ptb"]  # no staging folder left
    # the job's driver-side check reads it from the cache; a second call does not download
    monkeypatch.setenv("LSTM_PTB_URL", f"http://127.0.0.1:{closed_port()}/unreachable.tgz")
    PTBTask.read_data(PTBConfig(train_fraction=0.01), None)


@pytest.mark.parametrize(
    "corrupt,message", [("content", "is corrupt: ptb.train.txt has sha256"), ("truncated", "is not a valid archive")]
)
def test_a_corrupted_download_is_rejected_and_leaves_nothing(ptb_dir, server, cache, monkeypatch, corrupt, message):
    monkeypatch.setenv("LSTM_PTB_URL", server("/bad.tgz", build_tgz(ptb_dir, corrupt)))
    with pytest.raises(UserError, match=message) as info:
        download.locate("ptb")
    assert "\n" not in str(info.value) and "--data-dir" in str(info.value)
    assert list(cache.iterdir()) == []  # neither the files nor a staging folder


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("where", ["no server", "404"])
def test_offline_says_to_pass_data_dir(server, cache, monkeypatch, where):
    url = (
        f"http://127.0.0.1:{closed_port()}/x.tgz"
        if where == "no server"
        else server("/a.tgz", b"").replace("/a.tgz", "/b.tgz")
    )
    monkeypatch.setenv("LSTM_PTB_URL", url)
    with pytest.raises(UserError, match=r"could not download .*pass --data-dir"):
        PTBTask.read_data(PTBConfig(), None)
    assert list(cache.iterdir()) == []
