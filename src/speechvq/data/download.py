"""Resumable HTTP download with MD5 verification, and tar extraction that cannot escape its target."""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from speechvq.errors import UserInputError
from speechvq.files import NO_SPACE, read_text, require_file, writing

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
    for lineno, line in enumerate(read_text(path, "checksum file").splitlines(), start=1):
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


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what :func:`safe_extract` writes, checked from the member headers before anything
    is written (a crafted archive of a few kB can otherwise expand to any size)."""

    max_total_bytes: int = 1 << 40
    """Most bytes all members together may hold (1 TiB; LibriSpeech's largest subset is ~30 GB)."""
    max_members: int = 2_000_000
    """Most members (files, directories, links; LibriSpeech's largest subset has ~150k)."""
    max_ratio: float = 100.0
    """Most bytes extracted per byte of archive (FLAC in a tar.gz is ~1); only checked above
    ``ratio_floor_bytes``."""
    ratio_floor_bytes: int = 16 << 20
    """Extractions smaller than this (16 MiB) are never refused for their ratio."""


def _scan_members(tar: tarfile.TarFile, archive: Path, target: Path, limits: ExtractLimits) -> list[str]:
    """Read the member headers one by one, refusing as soon as a limit is passed (so a bomb is not
    decompressed to the end); returns the problems of members that would overwrite the archive."""
    archive_size = max(archive.stat().st_size, 1)
    archive_abs = os.path.normpath(os.path.abspath(archive))
    target_abs = os.path.normpath(os.path.abspath(target))
    total, count, problems = 0, 0, []
    while (member := tar.next()) is not None:
        count += 1
        total += max(member.size, 0) if member.isfile() else 0
        if count > limits.max_members:
            raise UserInputError(
                f"{archive}: refusing to extract: more than {limits.max_members} members (ExtractLimits.max_members)"
            )
        if total > limits.max_total_bytes:
            raise UserInputError(
                f"{archive}: refusing to extract: the members hold more than {limits.max_total_bytes} bytes "
                f"(ExtractLimits.max_total_bytes; {member.name} alone claims {member.size})"
            )
        if total > limits.ratio_floor_bytes and total / archive_size > limits.max_ratio:
            raise UserInputError(
                f"{archive}: refusing to extract: {total} bytes from a {archive_size}-byte archive is more than "
                f"{limits.max_ratio:g} times its size (a decompression bomb? ExtractLimits.max_ratio)"
            )
        dest = os.path.normpath(os.path.join(target_abs, member.name))
        if dest == archive_abs:
            problems.append(f"{member.name}: would overwrite the archive being read")
        elif archive_abs.startswith(dest + os.sep) and not member.isdir():
            problems.append(f"{member.name}: would replace the directory holding the archive")
    free = shutil.disk_usage(target).free
    if total > free:
        raise UserInputError(
            f"{NO_SPACE}: {target} (extracting {archive} needs {total} bytes, {free} are free)"
        )
    return problems


def _merge_into(tmp: Path, target: Path) -> None:
    """Move the extracted tree ``tmp`` into ``target`` (renames only; existing files are replaced)."""
    for root, dirs, files in os.walk(tmp):
        rel = Path(root).relative_to(tmp)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.replace(Path(root) / name, target / rel / name)
        for name in list(dirs):  # links to directories are not walked into: move them as they are
            if (Path(root) / name).is_symlink():
                os.replace(Path(root) / name, target / rel / name)
                dirs.remove(name)


def safe_extract(archive: Path, target: Path, limits: ExtractLimits | None = None) -> list[str]:
    """Extract a tar archive into ``target``, refusing it entirely if any member is unsafe.

    Unsafe: absolute paths, ``..`` components, symbolic or hard links whose target is absolute or
    contains ``..``, device files, and members that would overwrite the archive itself. The
    archive is also refused when its members pass ``limits`` (total bytes, member count, bytes per
    archive byte) or need more space than ``target``'s file system has free. All checks run over
    every member header before anything is written; extraction then also uses tarfile's ``data``
    filter where available (Python >= 3.11.4). Members are extracted into a temporary directory
    inside ``target`` and moved into place at the end, so a failed extraction leaves nothing.

    Returns:
        The extracted member names.

    Raises:
        UserInputError: naming the archive and every unsafe member, or the limit passed; nothing
            is extracted.
    """
    limits = limits or ExtractLimits()
    with writing(target):
        target.mkdir(parents=True, exist_ok=True)
    for leftover in target.glob(".extract_*"):  # a killed extraction
        shutil.rmtree(leftover, ignore_errors=True)
    require_file(archive, "archive")
    try:
        tar = tarfile.open(archive)  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError) as err:
        raise UserInputError(f"{archive}: not a readable tar archive ({err})") from None
    with tar:
        try:
            problems = _scan_members(tar, archive, target, limits) + unsafe_members(tar)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise UserInputError(f"{archive}: damaged archive ({err})") from None
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise UserInputError(f"{archive}: refusing to extract {len(problems)} unsafe member(s): {shown}")
        tmp = Path(tempfile.mkdtemp(prefix=".extract_", dir=target))
        try:
            with writing(target):
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # pragma: no cover - Python < 3.11.4: the member check above is the only guard
                    tar.extractall(tmp)
                _merge_into(tmp, target)
        except (tarfile.TarError, EOFError, zlib.error) as err:
            raise UserInputError(f"{archive}: extraction refused: {err}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return tar.getnames()
