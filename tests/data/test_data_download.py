"""download-librispeech against a local HTTP server: resume, MD5, safe extraction."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from local_http import RangeHandler, libri_tarball, url
from speechvq.cli import main
from speechvq.data.download import download, safe_extract
from speechvq.errors import UserInputError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "real_speech" / "LibriSpeech"


def test_download_librispeech_end_to_end_resumes_verifies_and_extracts(server, tmp_path: Path) -> None:
    data = libri_tarball()
    server.files["dev-clean.tar.gz"] = data
    md5 = hashlib.md5(data).hexdigest()
    (tmp_path / "dev-clean.tar.gz.part").write_bytes(data[: len(data) // 3])  # an interrupted download
    args = ["download-librispeech", "--subset", "dev-clean", "--out", str(tmp_path), "--mirror", url(server)]
    assert main([*args, "--md5", md5]) == 0
    assert server.ranges == [f"bytes={len(data) // 3}-"]
    assert (tmp_path / "dev-clean.tar.gz").read_bytes() == data
    flacs = sorted((tmp_path / "LibriSpeech" / "dev-clean").rglob("*.flac"))
    assert len(flacs) == 4
    assert main(["prepare-librispeech", str(tmp_path / "LibriSpeech"), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "dev-clean.tsv").read_text().count("\n") == 5
    assert main([*args, "--md5", md5]) == 0  # a rerun does nothing
    assert len(server.ranges) == 1


def test_download_raises_on_checksum_mismatch_and_deletes_the_file(server, tmp_path: Path, capsys) -> None:
    server.files["dev-clean.tar.gz"] = libri_tarball()
    # the published dev-clean MD5 cannot match the tiny tarball
    args = ["download-librispeech", "--subset", "dev-clean", "--out", str(tmp_path), "--mirror", url(server)]
    assert main(args) == 2
    assert "MD5 checksum mismatch: expected 42e2234ba48799c1f50f24a7926300a1" in capsys.readouterr().err
    assert not (tmp_path / "dev-clean.tar.gz").exists() and not (tmp_path / "dev-clean.tar.gz.part").exists()
    assert not (tmp_path / "LibriSpeech").exists()


def test_download_restarts_when_the_server_ignores_range(server, tmp_path: Path) -> None:
    class NoRange(RangeHandler):
        def do_GET(self) -> None:
            del self.headers["Range"]
            super().do_GET()

    server.RequestHandlerClass = NoRange
    server.files["x.bin"] = b"0123456789" * 100
    (tmp_path / "x.bin.part").write_bytes(b"garbage")
    download(
        f"{url(server)}/x.bin", tmp_path / "x.bin", expected_md5=hashlib.md5(b"0123456789" * 100).hexdigest()
    )
    assert (tmp_path / "x.bin").read_bytes() == b"0123456789" * 100


def test_download_raises_naming_the_url_on_http_404(server, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"nothing\.tar\.gz: HTTP 404"):
        download(f"{url(server)}/nothing.tar.gz", tmp_path / "n.tar.gz")


def _crafted(tmp_path: Path) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:

        def add(name: str, payload: bytes = b"x", **kw: object) -> None:
            info = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(info, k, v)
            info.size = 0 if kw.get("type") in (tarfile.SYMTYPE, tarfile.LNKTYPE) else len(payload)
            tar.addfile(info, io.BytesIO(payload) if info.size else None)

        add("LibriSpeech/ok.txt")
        add("../escaped.txt")
        add("LibriSpeech/../../escaped2.txt")
        add(str(tmp_path / "absolute.txt"))
        add("LibriSpeech/link", type=tarfile.SYMTYPE, linkname="../../outside")
        add("LibriSpeech/abslink", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("LibriSpeech/hard", type=tarfile.LNKTYPE, linkname="../outside_hard")
        add("LibriSpeech/link/through.txt")
    return path


def test_safe_extract_refuses_dotdot_absolute_and_outside_links_and_writes_nothing(tmp_path: Path) -> None:
    archive = _crafted(tmp_path)
    target = tmp_path / "a" / "b" / "target"
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(UserInputError, match="refusing to extract 6 unsafe member") as err:
        safe_extract(archive, target)
    for needle in (
        "../escaped.txt: path with '..'",
        "absolute path",
        "link to '../../outside'",
        "'/etc/passwd'",
    ):
        assert needle in str(err.value)
    after = {p for p in tmp_path.rglob("*")}
    assert after - before <= {tmp_path / "a", tmp_path / "a" / "b", target}
    assert not any(target.iterdir())


def test_safe_extract_extracts_inside_links(tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("d/file.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
        link = tarfile.TarInfo("d/alias.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "file.txt"
        tar.addfile(link)
    safe_extract(archive, tmp_path / "t")
    assert (tmp_path / "t" / "d" / "alias.txt").read_text() == "hi"
