"""argparse types shared by the CLIs: bad numbers fail at parse time with
the flag named, before a model is loaded."""

import argparse
import os
from pathlib import Path


def _fail(text, what):
    raise argparse.ArgumentTypeError(f"{text!r} is not {what}")


def _int(text: str, low: int, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        _fail(text, "an integer")
    if n < low:
        _fail(text, what)
    return n


def positive_int(text: str) -> int:
    return _int(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    return _int(text, 0, "a non-negative integer")


def seconds(text: str) -> float:
    """A positive, finite number of seconds: 30, 0.5."""
    try:
        n = float(text)
    except ValueError:
        _fail(text, "a number of seconds")
    if not 0 < n < float("inf"):
        _fail(text, "a positive number of seconds")
    return n


def tokens(text: str) -> int:
    """A positive token count like 4096, 4K, 128k, 1M (K = 1024)."""
    t = str(text).strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if scale > 1 else t) * scale)
    except (ValueError, OverflowError):  # "x", "inf"
        _fail(text, "a token count (e.g. 4096, 4K, 1M)")
    if n <= 0:
        _fail(text, "a positive token count")
    return n


def token_list(text: str) -> tuple:
    """Comma-separated positive token counts: 1024,4K,32K."""
    return tuple(tokens(x) for x in str(text).split(","))


def fraction_list(text: str) -> tuple:
    """Comma-separated numbers in [0, 1]: 0.1,0.5,0.9."""
    try:
        values = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        _fail(text, "comma-separated numbers")
    if any(not 0 <= v <= 1 for v in values):
        _fail(text, "a list of numbers between 0 and 1")
    return values


def int_list(text: str) -> tuple:
    """Comma-separated positive integers: 2,3,4."""
    return tuple(positive_int(x) for x in str(text).split(","))


def count_list(text: str) -> tuple:
    """Comma-separated non-negative integers: 0,8,16."""
    return tuple(nonneg_int(x) for x in str(text).split(","))


def output_file(text: str) -> str:
    """A file to write at the end of a long run: its folder is made now, so
    a bad path fails before the work, not after."""
    path = Path(text).expanduser()
    if path.is_dir():
        _fail(text, "a file (it is a folder)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot make the folder of {text!r}: {e}") from None
    if not os.access(path.parent, os.W_OK):
        _fail(text, "writable")
    return str(path)


def add_prefill_step_size(p: argparse.ArgumentParser, default: int = 2048):
    """--prefill-step-size (mlx-lm's name; args.prefill_step_size), with the
    older --prefill-step kept as a hidden alias."""
    p.add_argument("--prefill-step-size", type=positive_int, default=default,
                   help="Prompt tokens per prefill chunk")
    p.add_argument("--prefill-step", dest="prefill_step_size", type=positive_int,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_model(p: argparse.ArgumentParser, also: str = "", windowed: bool = False):
    """--model, as mlx-lm names it; the embedded default model if not given.
    `also`: other forms the tool takes ("a config.json, "). windowed: also
    --sliding-window / --full-every (models.windowed_copy)."""
    from mlx_kvq.models import DEFAULT_MODEL

    p.add_argument("--model", default=None,
                   help=f"Model folder, {also}or Hugging Face id (default: the embedded "
                   f"{DEFAULT_MODEL})")
    if windowed:
        p.add_argument("--sliding-window", type=positive_int, default=None, metavar="N",
                       help="Run a copy of a llama-architecture model whose layers attend "
                       "to windows of N tokens (real weights, Gemma-3-style pattern)")
        p.add_argument("--full-every", type=positive_int, default=6, metavar="K",
                       help="With --sliding-window: every K-th layer keeps full attention")


def add_sharding(p: argparse.ArgumentParser, what: str):
    """--sharding and --peer-timeout, for a tool run under mlx.launch; `what`:
    what rank 0 does that the others do not."""
    from mlx_kvq.distributed import SHARDINGS

    d = p.add_argument_group("distributed (under mlx.launch)")
    d.add_argument("--sharding", choices=SHARDINGS, default=None,
                   help="Shard the model over the ranks mlx.launch started, as mlx-lm "
                   "does: 'tensor' splits every layer's heads, 'pipeline' gives each rank "
                   f"a run of layers; each rank caches its share. {what}")
    d.add_argument("--peer-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="Exit when the ranks make no progress for this long (a peer "
                   "stopped or its link is down); 0: wait forever")
