"""Sizes and token counts as people read and write them: "16GB" (powers of
1024, as RAM is sold), "1.50 GiB", "32K"."""

import re

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MAX_SEARCH = 1 << 26  # tokens: the planner searches contexts up to this bound


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_tokens(n: int) -> str:
    if n >= MAX_SEARCH:
        return f">{MAX_SEARCH >> 20}M"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f}M"
    if n >= 10 << 10 or n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


def parse_memory(text) -> int:
    """Bytes from "16GB", "16G", "1.5 TiB", "512MB", "17179869184" (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"cannot parse memory size {text!r}: use e.g. 16GB, 512MB, 1.5T")
    n = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return n
