"""mlx_kvq.assistant: a local long-context chat assistant on quantized KV caches.

A standard-library HTTP server with a chat page and an OpenAI-compatible API.
Each conversation keeps its quantized prompt cache in memory (within a memory
budget) and on disk, so a conversation continues without prefilling its
history again, also after a restart.
"""

import mlx_kvq  # noqa: F401  (first: on Linux it loads OpenBLAS before mlx)
