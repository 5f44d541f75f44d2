"""A local HTTP server for download tests (127.0.0.1 only) and a tiny LibriSpeech-layout tarball."""

from __future__ import annotations

import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "real_speech" / "LibriSpeech"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (name -> bytes), honouring ``Range: bytes=N-``; logs Range headers."""

    def do_GET(self) -> None:
        data = self.server.files.get(self.path.lstrip("/"))  # type: ignore[attr-defined]
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        self.server.ranges.append(rng)  # type: ignore[attr-defined]
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        if start >= len(data) and rng:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.files, srv.ranges = {}, []  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


def libri_tarball(split: str = "dev-clean") -> bytes:
    """A tiny tarball in LibriSpeech layout, ``LibriSpeech/<split>/<spk>/<chapter>/...``, made from
    the real test-clean excerpt in the fixtures."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted((FIXTURES / "test-clean").rglob("*")):
            tar.add(
                p,
                arcname=f"LibriSpeech/{split}/" + p.relative_to(FIXTURES / "test-clean").as_posix(),
                recursive=False,
            )
    return buf.getvalue()
