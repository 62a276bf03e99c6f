"""File helpers shared by loading, data provenance, exports, reports and benchmarks: hashing and atomic writes.

Writers here never leave a half-written result: they write into a temporary beside the target and
rename it. Temporaries carry their writer's host and PID in their name (`.NAME.rku-HOST-PID.XXXX`),
so that a later run can remove those of a writer that was killed (`sweep_stale_temporaries`), and
the older names earlier versions used once they are a day old.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

# A temporary whose writer cannot be asked (another host) is stale after this long: longer than any run.
STALE_AFTER_S = 24 * 3600
_TEMP_NAME = re.compile(r"^\..+\.rku-(?P<host>[A-Za-z0-9_-]*)-(?P<pid>\d+)\.[a-z0-9_]+(\.[a-z]+)?$")
# tempfile's random part: what the temporaries of earlier versions were named with, and nothing of their writer.
_TEMPFILE_RANDOM = r"[a-z0-9_]{8}"
# NamedTemporaryFile's default prefix: GGUF assemblies (`.part`) and JSON writes (`.tmp`) of earlier versions.
_LEGACY_UNNAMED = re.compile(rf"^tmp{_TEMPFILE_RANDOM}\.(part|tmp)$")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in blocks (GGUF files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _stat_fields(path: Path) -> dict:
    """Size and mtime, plus ctime and inode: `os.utime` can set mtime back after a write, but not ctime,
    and a file renamed or copied into place has a new ctime or inode."""
    found = path.stat()
    return {"size": found.st_size, "mtime_ns": found.st_mtime_ns, "ctime_ns": found.st_ctime_ns, "ino": found.st_ino}


def content_stamp(path: Path, sha256: str | None = None) -> dict:
    """sha256 and stat fields of a file: what `verified_stamp` compares later.

    A `sha256` the caller has just verified is recorded as given, so a large file is not read twice.
    """
    fields = _stat_fields(path)  # before hashing, as in `verified_stamp`
    return {"sha256": sha256 or sha256_file(path), **fields}


def verified_stamp(path: Path, stamp: dict) -> dict | None:
    """The stamp `path` has now if it still holds the content `stamp` recorded, else None.

    Unchanged stat fields are trusted (no rehash: loads stay fast); any change (a stamp of an earlier
    version lacks some fields) is rehashed, and matching content gets a fresh stamp, which the caller
    stores when it differs from `stamp` so that the next load is fast again.
    """
    try:
        fields = _stat_fields(path)  # before hashing: a write during the hash then shows as a change next time
    except FileNotFoundError:
        return None
    if all(stamp.get(key) == value for key, value in fields.items()):
        return stamp
    return {**stamp, **fields} if sha256_file(path) == stamp.get("sha256") else None


def share_like_open(path: Path) -> None:
    """Give a file or folder the permissions `open`/`mkdir` would have: tempfile makes them private (0600/0700).

    Files that have them already are left alone: a chmod changes ctime, which would void their stamps.
    """
    umask = os.umask(0)
    os.umask(umask)
    mode = (0o777 if path.is_dir() else 0o666) & ~umask
    if stat.S_IMODE(path.stat().st_mode) != mode:
        path.chmod(mode)


def share_tree(root: Path) -> None:
    """`share_like_open` on a folder and everything in it."""
    for path in [root, *root.rglob("*")]:
        share_like_open(path)


def check_can_create(path: Path, what: str) -> None:
    """Refuse, before any work, a `path` that cannot be created: its nearest existing ancestor must be a writable folder."""
    ancestor = Path(path).parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{what} {path}: {ancestor} is a file, so nothing can be created under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: {ancestor} is not writable; choose a folder you can write to")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def _owner_tag() -> str:
    return f"rku-{_host()}-{os.getpid()}"


def temporary_beside(target: Path, folder: bool = True, suffix: str = "") -> Path:
    """A private temporary folder (or empty file) beside `target`, named after it and its writer.

    Stale temporaries of killed writers in the same folder are swept first.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(target.parent, target=target.name)
    prefix = f".{target.name}.{_owner_tag()}."
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    handle, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    os.close(handle)
    return Path(name)


def _writer_gone(host: str, pid: int) -> bool:
    if host != _host() or pid == os.getpid():
        return False  # another machine's process (only its age can tell), or this one's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _legacy_temporary(name: str, target: str | None) -> bool:
    """Whether `name` is a temporary of an earlier version: `tmpXXXXXXXX.part`/`.tmp`, or, for the `target`
    being written, `.TARGET.XXXXXXXX` (also `.part`/`.tmp`: exports, `.hf.` conversions, reports).

    Hidden names are matched for that target only: `.bashrc.original` has the same form, but only
    `.pruned.XXXXXXXX` beside the `pruned` being written is surely a temporary.
    """
    if _LEGACY_UNNAMED.match(name):
        return True
    return target is not None and re.fullmatch(rf"\.{re.escape(target)}\.{_TEMPFILE_RANDOM}(\.part|\.tmp)?", name) is not None


def sweep_stale_temporaries(folder: Path, max_age_s: float = STALE_AFTER_S, target: str | None = None) -> list[Path]:
    """Remove the temporaries in `folder` whose writer process is gone or that are older than `max_age_s`.

    Those of earlier versions (`_legacy_temporary`, `target` being the name about to be written)
    record no writer, so only their age tells that they are stale.
    """
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match is None and not _legacy_temporary(path.name, target):
            continue
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:
            continue
        if age > max_age_s or (match is not None and _writer_gone(match["host"], int(match["pid"]))):
            remove_path(path)
            removed.append(path)
    if removed:
        warnings.warn(f"removed {len(removed)} temporaries left by interrupted runs in {folder}: "
                      + ", ".join(p.name for p in removed), stacklevel=2)
    return removed


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree, whichever `path` is; a missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_replaced(target: Path) -> None:
    """Finish a `replace_folder` that was killed: restore the old folder if the new one never arrived."""
    old = _aside(target)
    if not old.exists():
        return
    if target.exists():
        remove_path(old)
    else:
        os.replace(old, target)
        warnings.warn(f"{target}: an interrupted replacement left it missing; restored the previous copy", stacklevel=2)


def replace_folder(tmp: Path, target: Path) -> None:
    """Move the finished folder `tmp` to `target`, replacing an existing `target`.

    The old folder is renamed aside first and removed last; a kill between the two renames leaves
    `.TARGET.old`, which `recover_replaced` puts back on the next run. An empty `target` is replaced
    in one rename.
    """
    recover_replaced(target)
    if target.is_dir() and not any(target.iterdir()):
        os.replace(tmp, target)
        return
    if not target.exists():
        os.replace(tmp, target)
        return
    old = _aside(target)
    os.replace(target, old)
    os.replace(tmp, target)
    remove_path(old)


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = ".tmp") -> Path:
    """Let `write` fill a temporary file beside `path`, then rename it over `path`.

    Readers never see half a file, and a `write` that raises (a full disk, a failed checksum) leaves
    nothing behind: the old file, if any, stays as it was.
    """
    path = Path(path)
    tmp = temporary_beside(path, folder=False, suffix=suffix)
    try:
        write(tmp)
        share_like_open(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`write_file_atomic` for a text (UTF-8)."""
    return write_file_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folder_atomic(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary folder beside `out_dir`, then swap it in (`replace_folder`).

    An interrupted or failing `write` leaves no half-written folder; whether `out_dir` may be replaced
    is the caller's rule (exports: `check_export_target`).
    """
    out_dir = Path(out_dir)
    tmp = temporary_beside(out_dir)
    try:
        write(tmp)
        share_tree(tmp)  # mkdtemp makes a private folder; what is written is meant to be shared
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
