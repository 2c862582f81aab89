"""mlx_kvq: quantized KV caches for MLX and mlx-lm."""

from .blas import use_openblas

use_openblas()  # must precede the first `import mlx`

from .cache import KVQCache  # noqa: E402
from .integration import install, make_prompt_cache  # noqa: E402
from .models import load  # noqa: E402
from .spec import PRESETS, KVQuantSpec  # noqa: E402

install()

__version__ = "0.1.0"
__all__ = ["KVQCache", "KVQuantSpec", "PRESETS", "install", "load", "make_prompt_cache"]
