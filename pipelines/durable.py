"""Durable files and folders: the primitives the store, its commit log and the checkpoints
build on (a file is durable once it and the folders naming it are fsynced).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (renames, new files and folders in it) durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_directories(directory: Path) -> set[Path]:
    """Create ``directory`` and its missing parents; returns the folders whose entries
    changed (the parent of each folder created), which need an fsync to be durable."""
    missing = []
    probe = directory
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    directory.mkdir(parents=True, exist_ok=True)
    return {folder.parent for folder in missing}


def write_durably(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically and durably (temp file, fsync, rename)."""
    created_in = make_directories(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        for folder in [path.parent, *sorted(created_in, key=lambda p: len(p.parts), reverse=True)]:
            fsync_directory(folder)
    finally:
        tmp.unlink(missing_ok=True)
