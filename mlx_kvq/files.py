"""File helpers shared by the package: atomic JSON writes and file
replacement (a reader sees the old file or the new one, never part of
one), and content hashes."""

import hashlib
import json
import os
import shutil
from pathlib import Path


def write_json(path: Path, obj):
    """Write JSON through a temporary file: replaces, never edits, a
    (possibly hard-linked) file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def replace_with(src: Path, dst: Path):
    """Atomically make dst a copy of src (a hard link when the file system allows)."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
