"""Build the native CPU kernels against the MLX that is installed.

    python -m mlx_kvq.cpu_kernels.build          # setup.sh runs this
    python -m mlx_kvq.cpu_kernels.build --force  # build again

The extension is compiled on the machine that runs it (CMake, a C++20
compiler, MLX's own headers, CMake config and libmlx from its wheel, and
nanobind at the version MLX was built with: arrays cross between them only
when the two share nanobind's ABI), with the machine's instruction set. It
is stored under ``<cache home>/native/<key>/``, the key a hash of the
sources, the MLX and nanobind versions, the Python ABI and the machine: a
new MLX or a change to the sources needs a new build, and until it is built
attention runs on the pure-MLX path (the loader says so in one line). A
build that fails changes nothing: the command prints why and exits 0
(``--strict`` exits 1), since everything works without the extension.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("CMakeLists.txt", "attention.h", "attention.cpp", "codes.h", "decode.h", "decode.cpp",
           "prefill.h", "prefill.cpp", "pool.h", "bindings.cpp")
MODULE = "_native"


def _versions() -> dict:
    import mlx.core as mx

    try:
        from importlib.metadata import version

        nanobind = version("nanobind")
    except Exception:
        nanobind = None
    return {"mlx": mx.__version__, "nanobind": nanobind,
            "python": sys.implementation.cache_tag, "machine": platform.machine()}


def key() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    h.update(repr(sorted(_versions().items())).encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    from mlx_kvq.files import cache_home

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return cache_home() / "native" / key() / f"{MODULE}{suffix}"


def load(path: Path):
    """Import the built extension and check that MLX arrays cross into it
    (they do only when it shares MLX's nanobind ABI and domain)."""
    import importlib.machinery
    import importlib.util

    import mlx.core as mx

    name = f"mlx_kvq.cpu_kernels.{MODULE}"
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_file_location(name, path, loader=loader))
    loader.exec_module(module)
    q = mx.zeros((1, 1, 1, 32))
    k = mx.zeros((1, 1, 1, 32), dtype=mx.float16)
    mx.eval(module.decode_attention(q, [k, k], [(0, 0, 0, 0, 32)], [1], [0]))
    return module


def missing_tools() -> list[str]:
    """What a build needs that this machine lacks."""
    out = []
    if not shutil.which("cmake"):
        out.append("cmake (apt install cmake, or pip install cmake)")
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
            or shutil.which("clang++")):
        out.append("a C++20 compiler (g++ or clang++)")
    if _versions()["nanobind"] is None:
        out.append("nanobind (pip install mlx-kvq's dependencies)")
    return out


def build(force: bool = False, verbose: bool = False) -> Path:
    """Compile the extension if it is not built for this MLX; return its path.
    Raises RuntimeError saying why when it cannot."""
    target = library_path()
    if target.is_file() and not force:
        return target
    missing = missing_tools()
    if missing:
        raise RuntimeError("missing " + ", ".join(missing))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build.", dir=target.parent) as tmp:
        configure = ["cmake", "-S", str(SOURCE_DIR), "-B", tmp,
                     f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
                     f"-DKVQ_NATIVE_ARCH={'OFF' if os.environ.get('MLX_KVQ_PORTABLE') else 'ON'}"]
        for cmd in (configure, ["cmake", "--build", tmp, "-j", str(os.cpu_count() or 2)]):
            run = subprocess.run(cmd, capture_output=not verbose, text=True)
            if run.returncode:
                tail = (run.stderr or run.stdout or "")[-3000:] if not verbose else ""
                raise RuntimeError(f"`{' '.join(cmd[:2])}` failed:\n{tail}")
        built = next(Path(tmp).glob(f"{MODULE}*{Path(target).suffix}"), None)
        if built is None:
            raise RuntimeError(f"the build made no {MODULE} module in {tmp}")
        staged = target.with_name(f".{target.name}.tmp")
        shutil.copy2(built, staged)
        os.replace(staged, target)
    return target


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_kvq.cpu_kernels.build",
                                description="Build mlx_kvq's native CPU attention kernel "
                                            "against the installed MLX.")
    p.add_argument("--force", action="store_true", help="build again even if built")
    p.add_argument("--strict", action="store_true", help="exit 1 when the build fails")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = p.parse_args(argv)
    try:
        path = build(force=args.force, verbose=args.verbose)
    except RuntimeError as e:
        print(f"mlx_kvq: native CPU kernel not built ({e}); attention runs on the "
              "pure-MLX path", file=sys.stderr)
        return 1 if args.strict else 0
    try:
        module = load(path)
    except Exception as e:
        print(f"mlx_kvq: native CPU kernel built at {path} but unusable "
              f"({type(e).__name__}: {e}); attention runs on the pure-MLX path",
              file=sys.stderr)
        return 1 if args.strict else 0
    print(f"mlx_kvq: native CPU kernel ready ({module.threads()} threads): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
