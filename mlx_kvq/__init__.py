"""mlx_kvq: quantized KV caches for MLX and mlx-lm."""

from .blas import use_openblas

use_openblas()  # must precede the first `import mlx`

from .batch_cache import KVQBatchCache  # noqa: E402
from .cache import KVQCache  # noqa: E402
from .integration import (  # noqa: E402
    batch_generate, install, make_batch_prompt_caches, make_prompt_cache)
from .models import load  # noqa: E402
from .spec import PRESETS, KVQuantSpec  # noqa: E402

install()

__version__ = "0.1.0"
__all__ = ["KVQBatchCache", "KVQCache", "KVQuantSpec", "PRESETS", "batch_generate", "install",
           "load", "make_batch_prompt_caches", "make_prompt_cache"]
