"""A Hugging Face tokenizer from a GGUF file's metadata.

``build_tokenizer`` makes a ``tokenizers.Tokenizer`` from the file's
vocabulary: SentencePiece BPE (``tokenizer.ggml.model = llama``: llama 2,
gemma, mistral files) from the pieces and their scores, or byte-level BPE
(``gpt2``) from the vocabulary and merges, split the
way the file's pre-tokenizer (``tokenizer.ggml.pre``) says: GPT-2's regex
(gpt2, default, mpt, olmo), single digits first (smollm, starcoder, refact,
command-r, codeshell), llama 3's regex (llama-bpe, llama3, llama-v3, falcon3,
smaug-bpe, dbrx) or Qwen 2's (qwen2, deepseek-r1-qwen, megrez). Control
tokens become special tokens, user-defined ones added tokens.
``tokenizer_config`` gives the matching ``tokenizer_config.json`` with the
special tokens and the chat template (``tokenizer.chat_template``).
"""

import numpy as np

from .gguf_arch import GGUFError

# The split regexes of llama.cpp's pre-tokenizers (llama-vocab.cpp), as the
# models' own tokenizer.json files write them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt2", "default", "mpt", "olmo"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), "digits"),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"), "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), "qwen2"),
}


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, normalizers, pre_tokenizers

    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:
        raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported; the converter knows "
                        f"{', '.join(sorted(PRE_TOKENIZERS))}")
    if kind == "gpt2":
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits":
        # llama.cpp splits every digit on its own before the GPT-2 regex.
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT
    normalizer = normalizers.NFC() if kind == "qwen2" else None
    return normalizer, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer(meta: dict):
    """A ``tokenizers.Tokenizer`` from the GGUF vocabulary: byte-level BPE
    (``gpt2``) or SentencePiece BPE (``llama``)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        tok = _sentencepiece(meta)
    elif kind == "gpt2":
        tok = _byte_level(meta)
    else:
        raise GGUFError(f"GGUF tokenizer {kind!r} is not supported; the converter builds "
                        "byte-level BPE (gpt2) and SentencePiece BPE (llama) tokenizers")
    _add_special(tok, meta)
    return tok


def _byte_level(meta: dict):
    from tokenizers import Tokenizer, decoders, models, processors

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                   byte_fallback=False))
    except Exception as e:  # tokenizers raises plain Exceptions
        raise GGUFError(f"the GGUF vocabulary and merges disagree: {e}") from e
    normalizer, pre = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt2"))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _token_types(meta: dict, n: int) -> list:
    types = meta.get("tokenizer.ggml.token_type")
    return [NORMAL] * n if types is None else np.asarray(types).tolist()


def _sentencepiece(meta: dict):
    """SentencePiece BPE as llama.cpp runs it (llm_tokenizer_spm): spaces are
    "▁", a "▁" goes first unless tokenizer.ggml.add_space_prefix is false,
    and adjacent pieces merge best score first, which is BPE with the merges
    of every piece ordered by its score (as transformers' SentencePiece
    converter orders them); bytes without a piece fall back to <0xXX>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise GGUFError("a SentencePiece (llama) GGUF tokenizer needs a score per token "
                        "(tokenizer.ggml.scores)")
    scores = np.asarray(scores, dtype=np.float64).tolist()
    types = _token_types(meta, len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, kind in zip(tokens, types) if kind in (NORMAL, USER_DEFINED)}
    merges = []
    for piece, score in zip(tokens, scores):
        if piece not in mergeable:
            continue
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                 if piece[:i] in mergeable and piece[i:] in mergeable]
        merges += [(left, right, score) for left, right in
                   sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: -m[2])  # stable: ties keep vocabulary order
    unk = next((t for t, kind in zip(tokens, types) if kind == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[m[:2] for m in merges], unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    replace = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("\u2581")] if prefix else []) + replace)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", True) and bos is not None:
        b = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, int(bos))])
    return tok


def _add_special(tok, meta: dict):
    """Control tokens as special tokens, user-defined ones as added tokens."""
    from tokenizers import AddedToken

    tokens = list(meta["tokenizer.ggml.tokens"])
    types = _token_types(meta, len(tokens))
    control = [t for t, kind in zip(tokens, types) if kind == CONTROL]
    user = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def tokenizer_config(meta: dict, context_length: int) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key):
        key = f"tokenizer.ggml.{key}_token_id"
        return tokens[int(meta[key])] if key in meta else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # llama.cpp adds BOS by default to SentencePiece vocabularies only.
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token",
                                       meta.get("tokenizer.ggml.model") == "llama")),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(context_length),
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {k: v for k, v in config.items() if v is not None}
