"""Resumable HTTP download with MD5 verification, and tar extraction that cannot escape its target."""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from speechvq.errors import UserInputError

logger = logging.getLogger(__name__)

LIBRISPEECH_MIRROR = "https://www.openslr.org/resources/12"
# MD5 sums published in https://www.openslr.org/resources/12/md5sum.txt
LIBRISPEECH_MD5 = {
    "dev-clean": "42e2234ba48799c1f50f24a7926300a1",
    "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
    "test-clean": "32fa31d27d2e1cad72775fee3f4849a9",
    "test-other": "fb5a50374b501bb3bac4815ee91d3135",
    "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
    "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
    "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
}


def md5sum(path: Path, chunk_size: int = 1 << 22) -> str:
    """Hex MD5 of a file."""
    h = hashlib.md5()
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def read_md5_table(path: Path) -> dict[str, str]:
    """Parse an ``md5sum.txt`` (``<md5>  <filename>`` per line) into subset name -> md5."""
    table = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 32:
            raise UserInputError(f"{path}:{lineno}: expected '<md5> <filename>', got {line!r}")
        name = parts[1].lstrip("*")
        table[name.removesuffix(".tar.gz")] = parts[0].lower()
    return table


def download(
    url: str,
    dest: Path,
    *,
    expected_md5: str | None = None,
    chunk_size: int = 1 << 20,
    timeout_s: float = 60.0,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with an HTTP Range request.

    A complete ``dest`` whose MD5 matches is not downloaded again. A server that ignores Range
    (answers 200) restarts the download from zero.

    Raises:
        UserInputError: the server answers with an error, the download keeps failing, or the
            MD5 does not match (the bad file is deleted so that a rerun starts over).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if expected_md5 is None or md5sum(dest) == expected_md5:
            logger.info("%s: already downloaded", dest)
            return dest
        logger.warning("%s: exists but its MD5 does not match; downloading again", dest)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, retries + 1):
        try:
            _fetch(url, part, chunk_size, timeout_s)
            break
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code != 416 and 400 <= err.code < 500:
                raise UserInputError(f"{url}: HTTP {err.code} {err.reason}") from None
            if attempt == retries:
                raise UserInputError(f"{url}: download failed after {retries} attempts ({err})") from None
            logger.warning("%s: %s; retrying (%d/%d)", url, err, attempt, retries)
            time.sleep(min(2**attempt, 30))
    if expected_md5 is not None:
        got = md5sum(part)
        if got != expected_md5.lower():
            part.unlink()
            raise UserInputError(
                f"{dest}: MD5 checksum mismatch: expected {expected_md5}, got {got} (file deleted; rerun to download again)"
            )
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, chunk_size: int, timeout_s: float) -> None:
    """Append the missing bytes of ``url`` to ``part``."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to fetch: the part file is complete
            return
        raise
    with response:
        status = response.status
        if have and status == 200:
            logger.info("%s: server does not resume (HTTP 200); restarting", url)
            have = 0
        elif have:
            logger.info("%s: resuming at byte %d", url, have)
        total = response.headers.get("Content-Length")
        expected = int(total) + have if total is not None else None
        with part.open("ab" if have else "wb") as out:
            while block := response.read(chunk_size):
                out.write(block)
    if expected is not None and part.stat().st_size != expected:
        raise ConnectionError(f"connection closed at {part.stat().st_size} of {expected} bytes")


def unsafe_members(tar: tarfile.TarFile) -> list[str]:
    """Members that would land or point outside the extraction directory, with the reason."""
    problems = []
    for m in tar.getmembers():
        name = m.name
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            problems.append(f"{name}: absolute path")
        elif ".." in parts:
            problems.append(f"{name}: path with '..'")
        elif m.issym() or m.islnk():
            link = m.linkname.replace("\\", "/")
            base = posixpath.dirname(name) if m.issym() else ""  # hard links are relative to the root
            outside = posixpath.normpath(posixpath.join(base, link)).startswith("..")
            if link.startswith("/") or ".." in link.split("/") or outside:
                problems.append(f"{name}: link to {m.linkname!r} points outside the target")
        elif m.isdev() or m.isfifo():
            problems.append(f"{name}: device or fifo")
    return problems


def safe_extract(archive: Path, target: Path) -> list[str]:
    """Extract a tar archive into ``target``, refusing it entirely if any member is unsafe.

    Unsafe: absolute paths, ``..`` components, symbolic or hard links whose target is absolute or
    contains ``..``, device files. The check runs over every member before anything is written;
    extraction then also uses tarfile's ``data`` filter where available (Python >= 3.11.4).

    Returns:
        The extracted member names.

    Raises:
        UserInputError: naming the archive and every unsafe member; nothing is extracted.
    """
    target.mkdir(parents=True, exist_ok=True)
    try:
        tar = tarfile.open(archive)  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError) as err:
        raise UserInputError(f"{archive}: not a readable tar archive ({err})") from None
    with tar:
        problems = unsafe_members(tar)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise UserInputError(f"{archive}: refusing to extract {len(problems)} unsafe member(s): {shown}")
        try:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, filter="data")
            else:  # pragma: no cover - Python < 3.11.4: the member check above is the only guard
                tar.extractall(target)
        except tarfile.TarError as err:
            raise UserInputError(f"{archive}: extraction refused: {err}") from None
        return tar.getnames()
