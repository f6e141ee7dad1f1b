"""Writing outputs so that a crash never leaves half of one: everything the project writes
(checkpoints, exports, reports, plots, caches) is written under a temporary name beside
its destination and renamed into place, which readers see as the old output or the new
one, never a mix. The one home of that logic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def new_temp_dir(out: str | Path) -> Path:
    """An empty folder beside `out` to build its replacement in."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def write_directory_atomically(out: str | Path, write: Callable[[Path], None], tmp: Path | None = None) -> Path:
    """Call `write(tmp_dir)`, then swap tmp_dir in as `out` (the old one is removed last).
    `tmp`: a folder from `new_temp_dir(out)` that other processes have already written into
    (an FSDP run's shards)."""
    out = Path(out)
    tmp = tmp or new_temp_dir(out)
    try:
        write(tmp)
        _make_readable(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_file_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_file)` beside `path`, then rename it over `path`: readers see the
    old file or the new one, never half of one (reports, plots)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _make_readable(directory: Path) -> None:
    """mkdtemp/mkstemp create owner-only files; give the checkpoint the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
