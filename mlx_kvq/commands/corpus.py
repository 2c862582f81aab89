"""Evaluation and calibration text: Jane Austen's six novels, the King James
Bible, a bundled excerpt, user files.

The novels come from Debian's ``r-cran-janeaustenr`` package, whose data are
an R lazy-load database: ``Rdata.rdx`` is a compressed serialized R list of
``(offset, length)`` records into ``Rdata.rdb``; each record is a 4-byte
length followed by a compressed serialized R object (here, a character
vector of lines).  ``rdata`` parses the serialized objects.
"""

import argparse
import bz2
import gzip
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, Union

from mlx_kvq.models import cache_home

PACKAGE = "r-cran-janeaustenr"
SYSTEM_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
DATA_FILES = ("Rdata.rdb", "Rdata.rdx")

# R object names, in the order and with the titles of janeaustenr::austen_books().
TITLES = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

SAMPLE = Path(__file__).parent.parent / "data" / "sample.txt"


class CorpusError(RuntimeError):
    """The corpus could not be fetched or parsed."""


def corpus_dir() -> Path:
    return cache_home() / "corpora" / "janeaustenr"


def _has_data(path: Path) -> bool:
    return all((path / f).is_file() for f in DATA_FILES)


def extract_deb(package: str, tmp: Path) -> Path:
    """Download a Debian package (``apt-get download``; no root needed) and
    extract it under `tmp`; returns the extracted root."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusError(
            f"this text comes from the Debian package {package}, but apt-get/dpkg-deb "
            "are not available here: use the bundled sample or your own files instead"
        )
    tmp.chmod(0o777)  # apt drops to the _apt user for downloads when it can write here
    run = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True,
                         text=True)
    debs = list(tmp.glob(f"{package}_*.deb"))
    if run.returncode != 0 or not debs:
        raise CorpusError(f"`apt-get download {package}` failed (run `apt-get update` "
                          f"first?):\n" + (run.stderr or run.stdout).strip())
    root = tmp / "root"
    run = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], capture_output=True,
                         text=True)
    if run.returncode != 0:
        raise CorpusError(f"could not extract {debs[0].name}: {run.stderr.strip()}")
    return root


def fetch_austen(force: bool = False) -> Path:
    """The folder holding Rdata.rdb/.rdx, extracting the Debian package into
    the cache on first use (``apt-get download``; no root needed)."""
    target = corpus_dir()
    if not force:
        for path in (target, SYSTEM_DIR):
            if _has_data(path):
                return path
    with tempfile.TemporaryDirectory() as tmp:
        extracted = extract_deb(PACKAGE, Path(tmp))
        source = extracted / SYSTEM_DIR.relative_to("/")
        if not _has_data(source):
            raise CorpusError(f"{PACKAGE} holds no Austen data at {source}")
        staging = Path(tempfile.mkdtemp(prefix=".janeaustenr.", dir=_mkparent(target)))
        staging.chmod(0o755)
        for name in DATA_FILES:
            shutil.copy2(source / name, staging / name)
        copyright_file = extracted / "usr/share/doc" / PACKAGE / "copyright"
        if copyright_file.is_file():
            shutil.copy2(copyright_file, staging / "copyright")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


def _decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return zlib.decompress(data)


def _parse_r(data: bytes):
    import warnings

    import rdata

    with warnings.catch_warnings():
        # rdata warns that a bare serialization stream is "assumed RDS"; it is.
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def _record(rdb: bytes, offset: int, length: int, compressed) -> bytes:
    rec = rdb[offset : offset + length]
    if len(rec) != length or length < 5:
        raise ValueError("record out of range")
    body = rec[4:]
    # R's `compress = 2/3` records carry a type byte after the length.
    if compressed in (2, 3) and body[:1] in (b"Z", b"2", b"1", b"0"):
        kind, body = body[:1], body[1:]
        return {b"Z": lzma.decompress, b"2": bz2.decompress, b"1": zlib.decompress}.get(
            kind, bytes
        )(body)
    return zlib.decompress(body) if compressed else body


def read_lazyload_db(folder: Path, names: Iterable[str]) -> dict:
    """Objects ``names`` from the R lazy-load database ``folder/Rdata.*``."""
    try:
        index = _parse_r(_decompress((folder / "Rdata.rdx").read_bytes()))
        variables = {str(k): v for k, v in index["variables"].items()}
        compressed = index.get("compressed", [True])
        compressed = int(compressed[0]) if hasattr(compressed, "__len__") else int(compressed)
        rdb = (folder / "Rdata.rdb").read_bytes()
        out = {}
        for name in names:
            offset, length = (int(x) for x in variables[name])
            out[name] = _parse_r(_record(rdb, offset, length, compressed))
        return out
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(
            f"Corrupt or unexpected R data in {folder} ({type(e).__name__}: {e}); "
            "delete the folder to fetch it again"
        ) from e


@lru_cache(maxsize=1)
def _austen_books() -> tuple:
    objects = read_lazyload_db(fetch_austen(), TITLES)
    books = []
    for name, title in TITLES.items():
        lines = ["" if line is None else str(line) for line in objects[name]]
        books.append((title, "\n".join(lines).strip() + "\n"))
    return tuple(books)


def austen_books() -> Dict[str, str]:
    """Jane Austen's six novels as ``{title: text}``, lines joined with newlines
    (paragraphs are separated by blank lines)."""
    return dict(_austen_books())


def sample_text() -> str:
    """A ~60 KB public-domain excerpt (the opening chapters of Pride and
    Prejudice) bundled with the package, for use without apt."""
    return SAMPLE.read_text(encoding="utf-8")


def _render_messages(messages) -> str:
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


def jsonl_texts(path: Path, render_messages=_render_messages) -> list:
    """Records of a .jsonl file: a "text" string, or a "messages" chat list
    rendered by `render_messages` (plain "role: content" lines by default)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                texts.append(record["text"])
            elif isinstance(record, dict) and isinstance(record.get("messages"), list):
                texts.append(render_messages(record["messages"]))
            else:
                raise ValueError(f'{path}:{lineno}: expected a "text" string or a "messages" list')
    return texts


def load_texts(paths: Union[str, Path, Iterable[Union[str, Path]]]) -> str:
    """The text of user files joined by blank lines: ``.txt`` as is, ``.jsonl``
    one record per line with a ``"text"`` field or ``"messages"`` chat
    (rendered as ``role: content`` lines)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"Text file not found: {path}")
        if path.suffix == ".jsonl":
            texts.extend(jsonl_texts(path))
        else:
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text") from e
    if not texts:
        raise ValueError("No text found in " + ", ".join(map(str, paths)))
    return "\n\n".join(texts)


# -- calibration workloads --------------------------------------------------------


KJV_PACKAGE = "bible-kjv-text"
KJV_FILE = "usr/lib/bible.data"


def _fetch_deb_file(package: str, member: str, target: Path) -> Path:
    """One file of a Debian package: the installed one, else extracted once into `target`."""
    system = Path("/") / member
    if system.is_file():
        return system
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        root = extract_deb(package, Path(tmp))
        _mkparent(target)
        shutil.copy2(root / member, target.with_suffix(".part"))
        os.replace(target.with_suffix(".part"), target)
    return target


def _lzw_decode(data: bytes, max_bits: int = 16) -> bytes:
    """Unix `compress` (LZW, block mode) codes, without the 3-byte header."""
    out, table = bytearray(), [bytes([i]) for i in range(256)] + [b""]
    n_bits, pos, group, prev, end = 9, 0, 0, None, len(data) * 8

    def realign():  # compress writes codes in groups of n_bits bytes
        return group + -(-(pos - group) // (n_bits * 8)) * n_bits * 8

    while pos + n_bits <= end:
        word = int.from_bytes(data[pos >> 3:(pos >> 3) + 3], "little")
        code = (word >> (pos & 7)) & ((1 << n_bits) - 1)
        pos += n_bits
        if code == 256:  # clear
            del table[257:]
            pos = group = realign()
            n_bits, prev = 9, None
            continue
        if code < len(table):
            entry = table[code]
        elif code == len(table) and prev is not None:
            entry = prev + prev[:1]
        else:
            raise ValueError(f"corrupt LZW stream (code {code})")
        if prev is not None:
            table.append(prev + entry[:1])
        out += entry
        prev = entry
        if len(table) > (1 << n_bits) - 1 and n_bits < max_bits:
            pos = group = realign()
            n_bits += 1
    return bytes(out)


def kjv_text() -> str:
    """The King James Bible from Debian's bible-kjv-text: its bible.data holds
    LZW (`compress`) windows that restart at checkpoints; verse references
    are dropped, verses joined, one paragraph per chapter."""
    path = _fetch_deb_file(KJV_PACKAGE, KJV_FILE, cache_home() / "corpora" / "kjv" / "bible.data")
    data = path.read_bytes()
    if not data.startswith(b"EC02"):
        raise ValueError(f"{path} is not a bible-kjv compressed data file")
    _, n = struct.unpack(">II", data[0x54:0x5C])
    offsets = struct.unpack(f">{n + 1}I", data[0x5C:0x5C + 4 * (n + 1)])
    text = b"".join(_lzw_decode(data[a:b]) for a, b in zip(offsets, offsets[1:]))
    chapters, key = [], None
    for line in text.decode("ascii").splitlines()[1:]:  # line 0: a title
        ref, _, verse = line.partition(" ")
        chapter = ref.split(":")[0]
        if chapter != key:
            chapters.append([])
            key = chapter
        chapters[-1].append(verse)
    return "\n\n".join(" ".join(c) for c in chapters) + "\n"


def _austen_selection(selector: str) -> str:
    """"austen", "austen:emma,persuasion" (those novels) or "austen:-persuasion"
    (all but those); novels are named by the start of janeaustenr's keys."""
    _, _, names = selector.partition(":")
    keys = list(TITLES)
    if names:
        drop = names.startswith("-")
        picked = {k for n in names.lstrip("-").split(",") for k in keys if k.startswith(n)}
        if not picked:
            raise ValueError(f"no Austen novel matches {names!r}; keys: {', '.join(keys)}")
        keys = [k for k in keys if (k in picked) != drop]
    books = austen_books()
    return "\n\n".join(books[TITLES[k]] for k in keys)


def _jsonl(path: Path, tokenizer) -> str:
    """Chat transcripts rendered with the model's chat template, or "text" records."""

    def render(messages):
        if not getattr(tokenizer, "has_chat_template", False):
            raise ValueError(f"{path}: chat transcripts need a tokenizer with a chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False)

    return "\n\n".join(jsonl_texts(path, render))


def source_text(source: str, tokenizer=None) -> str:
    """The text of one workload source: austen[:...], kjv, sample, or a
    .txt / .jsonl file."""
    if source == "austen" or source.startswith("austen:"):
        return _austen_selection(source)
    if source == "kjv":
        return kjv_text()
    if source == "sample":
        return sample_text()
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"workload source {source!r}: no such file (or use "
                                "austen, austen:<novels>, kjv, sample)")
    return _jsonl(path, tokenizer) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Jane Austen corpus for mlx_kvq evaluations")
    parser.add_argument("--fetch", action="store_true", help="Download and extract the corpus")
    parser.add_argument("--force", action="store_true", help="Fetch again even if cached")
    args = parser.parse_args(argv)
    try:
        if args.fetch or args.force:
            print(f"Austen corpus: {fetch_austen(force=args.force)}")
        for title, text in austen_books().items():
            print(f"  {title}: {len(text):,} characters")
    except (CorpusError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
