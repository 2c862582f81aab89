"""A Hugging Face tokenizer from a GGUF file's metadata.

``build_tokenizer`` makes a byte-level BPE ``tokenizers.Tokenizer``
(``tokenizer.ggml.model = gpt2``) from the vocabulary and merges, split the
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
    """A byte-level BPE ``tokenizers.Tokenizer`` from the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"GGUF tokenizer {kind!r} is not supported; the converter builds "
                        "byte-level BPE (gpt2) tokenizers")
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

    token_type = meta.get("tokenizer.ggml.token_type")
    if token_type is not None:
        token_type = np.asarray(token_type).tolist()
        control = [t for t, kind in zip(tokens, token_type) if kind == 3]  # CONTROL
        user = [t for t, kind in zip(tokens, token_type) if kind == 4]  # USER_DEFINED
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


def tokenizer_config(meta: dict, context_length: int) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key):
        key = f"tokenizer.ggml.{key}_token_id"
        return tokens[int(meta[key])] if key in meta else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
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
