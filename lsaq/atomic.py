"""Temporary files and folders beside their target, named after the process that owns them.

Every write that must appear whole (a record, an artifact directory, a download, a file in the local store, the
hidden states measure spills) goes to a hidden temporary beside its target and is renamed into place. A process
killed with ``kill -9`` cannot remove its own, so the name says who owns it::

    .model.safetensors.lsaq-<host>-<pid>-<random>.tmp

``<host>`` is a short hash of this machine's name and ``<pid>`` the writer's process id. The next writer of the
same target (:func:`temp_file`, :func:`temp_dir`), on the same machine, removes every such temporary whose process
no longer runs before making its own; one whose process still runs (a concurrent writer) or that another machine
made (a shared file system) is left alone, and so is anything not named this way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

SUFFIX = ".tmp"
TAG = "lsaq"


def umask() -> int:
    """This process's file mode creation mask (read by setting it and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def host_tag() -> str:
    """This machine's part of a temporary's name: 8 hex digits of its host name's sha256."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_prefix(name: str) -> str:
    """The start of this process's temporaries for a target called ``name``."""
    return f".{name}.{TAG}-{host_tag()}-{os.getpid()}-"


def _owner(entry: str, name: str) -> tuple[str, int] | None:
    """``(host tag, pid)`` of a temporary of the target ``name``, None for any other entry."""
    m = re.fullmatch(rf"\.{re.escape(name)}\.{TAG}-([0-9a-f]{{8}})-(\d+)-[^/]*{re.escape(SUFFIX)}", entry)
    return (m.group(1), int(m.group(2))) if m else None


def running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(target: Path) -> list[Path]:
    """The temporaries beside ``target`` that a process of this machine left when it died."""
    here, out = host_tag(), []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in target.parent.iterdir():
            owner = _owner(entry.name, target.name)
            if owner is not None and owner[0] == here and not running(owner[1]):
                out.append(entry)
    return sorted(out)


def sweep(target: Path) -> list[Path]:
    """Remove the stale temporaries of ``target`` (see the module doc); returns what was removed."""
    removed = stale_temporaries(target)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return removed


def temp_file(target: Path) -> Path:
    """A new empty temporary file beside ``target`` (mode as a new file's), after :func:`sweep`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    fd, tmp = tempfile.mkstemp(prefix=owner_prefix(target.name), suffix=SUFFIX, dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600; the result should look like any new file
    return Path(tmp)


def temp_dir(target: Path) -> Path:
    """A new empty temporary folder beside ``target`` (mode as a new folder's), after :func:`sweep`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    tmp = Path(tempfile.mkdtemp(prefix=owner_prefix(target.name), suffix=SUFFIX, dir=target.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it 0700; the result should look like any mkdir'd folder
    return tmp


__all__ = ["host_tag", "owner_prefix", "running", "stale_temporaries", "sweep", "temp_dir", "temp_file", "umask"]
