"""File helpers shared by the package: where mlx_kvq keeps its files,
atomic, durable writes (a reader, or a restart after a crash, sees the old
file or the new one, never part of one), atomic file replacement, and
content hashes."""

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable


def _home(xdg: str, fallback: str) -> Path:
    if os.environ.get("MLX_KVQ_HOME"):
        return Path(os.environ["MLX_KVQ_HOME"]).expanduser()
    base = os.environ.get(xdg) or Path.home() / fallback
    return Path(base).expanduser() / "mlx_kvq"


def cache_home() -> Path:
    """``$MLX_KVQ_HOME``, else ``$XDG_CACHE_HOME/mlx_kvq``, else ``~/.cache/mlx_kvq``:
    converted models, corpora, calibration checkpoints."""
    return _home("XDG_CACHE_HOME", ".cache")


def data_home() -> Path:
    """``$MLX_KVQ_HOME``, else ``$XDG_DATA_HOME/mlx_kvq``, else
    ``~/.local/share/mlx_kvq``: what users keep (the assistant's conversations)."""
    return _home("XDG_DATA_HOME", ".local/share")


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]):
    """Write `path` through `write(tmp)`, then fsync and rename into place."""
    # Keep the suffix: mx.save_safetensors appends ".safetensors" otherwise.
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_json(path: Path, obj):
    """Write JSON atomically and durably (atomic_write): replaces, never
    edits, a (possibly hard-linked) file."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n",
                                                        encoding="utf-8"))


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
