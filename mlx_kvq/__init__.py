"""mlx_kvq: quantized KV caches for MLX and mlx-lm."""

from importlib import metadata as _metadata

from .blas import use_openblas

use_openblas()  # must precede the first `import mlx`

from .batch_cache import KVQBatchCache  # noqa: E402
from .cache import KVQCache  # noqa: E402
from .integration import (  # noqa: E402
    batch_generate, install, make_batch_prompt_caches, make_prompt_cache)
from .models import load  # noqa: E402
from .spec import PRESETS, KVQuantSpec  # noqa: E402

install()

try:  # the version pyproject.toml gives, as installed
    __version__ = _metadata.version("mlx-kvq")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "unknown"
__all__ = ["KVQBatchCache", "KVQCache", "KVQuantSpec", "PRESETS", "batch_generate", "install",
           "load", "make_batch_prompt_caches", "make_prompt_cache"]
