"""SentencePiece GGUF vocabularies (tokenizer.ggml.model = llama): a BPE
model trained here with the sentencepiece package (normalized as llama's
are: identity, spaces kept), written into GGUF
metadata as llama.cpp's converter writes it (pieces, scores, token types,
add_space_prefix), becomes a tokenizer that splits held-out text into the
ids sentencepiece gives and decodes back to the text; the transformers
tokenizer a converted folder loads adds BOS as the file says."""

import io

import pytest

from mlx_kvq import gguf_tokenizer
from mlx_kvq.commands import corpus
from mlx_kvq.gguf_arch import GGUFError

spm = pytest.importorskip("sentencepiece")


def trained(prefix: bool, vocab_size: int = 600):
    text = corpus.sample_text()
    lines = [ln.strip() for ln in text[:40000].splitlines() if ln.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=prefix, remove_extra_whitespaces=False, split_digits=True,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    held_out = [ln.strip() for ln in text[40000:].splitlines() if ln.strip()]
    return sp, held_out


def gguf_meta(sp, prefix: bool) -> dict:
    """Metadata as llama.cpp's convert_hf_to_gguf.py writes a SentencePiece
    vocabulary (_set_vocab_sentencepiece)."""
    types = []
    for i in range(sp.get_piece_size()):
        types.append(gguf_tokenizer.UNKNOWN if sp.is_unknown(i) else
                     gguf_tokenizer.CONTROL if sp.is_control(i) else
                     gguf_tokenizer.UNUSED if sp.is_unused(i) else
                     gguf_tokenizer.BYTE if sp.is_byte(i) else gguf_tokenizer.NORMAL)
    return {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(sp.get_piece_size())],
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(),
            "tokenizer.ggml.add_space_prefix": prefix}


@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_vocabularies_tokenize_as_sentencepiece(prefix):
    sp, held_out = trained(prefix)
    tok = gguf_tokenizer.build_tokenizer(gguf_meta(sp, prefix))
    # Held-out prose, and text with bytes no piece covers (byte fallback).
    texts = held_out[:300] + ["Café — naïve résumé 2024!", "  two  spaces", "日本語"]
    mismatched = [t for t in texts
                  if tok.encode(t, add_special_tokens=False).ids != sp.encode(t)]
    assert not mismatched, mismatched[:3]
    for t in texts:
        assert tok.decode(tok.encode(t, add_special_tokens=False).ids) == sp.decode(sp.encode(t))
    assert tok.encode("Mr. Darcy").ids[0] == sp.bos_id()  # add_bos_token defaults on


def test_a_converted_sentencepiece_folder_loads_with_bos_and_special_tokens(tmp_path):
    from transformers import PreTrainedTokenizerFast

    sp, held_out = trained(True, 400)
    meta = gguf_meta(sp, True)
    gguf_tokenizer.build_tokenizer(meta).save(str(tmp_path / "tokenizer.json"))
    config = gguf_tokenizer.tokenizer_config(meta, 4096)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), **config)
    text = held_out[0]
    assert hf.encode(text) == [sp.bos_id()] + sp.encode(text)
    assert hf.decode(hf.encode(text), skip_special_tokens=True) == text
    assert hf.bos_token == "<s>" and hf.eos_token == "</s>"
    meta["tokenizer.ggml.add_bos_token"] = False
    assert gguf_tokenizer.build_tokenizer(meta).encode(text).ids == sp.encode(text)


def test_a_sentencepiece_vocabulary_without_scores_is_refused():
    sp, _ = trained(True, 400)
    meta = gguf_meta(sp, True)
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(GGUFError, match="score per token"):
        gguf_tokenizer.build_tokenizer(meta)
    meta["tokenizer.ggml.model"] = "bert"
    with pytest.raises(GGUFError, match="'bert' is not supported.*SentencePiece BPE"):
        gguf_tokenizer.build_tokenizer(meta)


def test_the_metadata_as_the_converter_reads_it_from_a_file(tmp_path):
    """The values GGUFReader gives back (numpy scalars, lists) build the same
    tokenizer as the Python values written."""
    from gguf import GGUFWriter

    from mlx_kvq import gguf

    sp, held_out = trained(True, 400)
    meta = gguf_meta(sp, True)
    w = GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", meta["tokenizer.ggml.tokens"])
    w.add_array("tokenizer.ggml.scores", meta["tokenizer.ggml.scores"])
    w.add_array("tokenizer.ggml.token_type", meta["tokenizer.ggml.token_type"])
    for key in ("bos", "eos", "unknown"):
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", meta[f"tokenizer.ggml.{key}_token_id"])
    w.add_bool("tokenizer.ggml.add_space_prefix", True)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    read = gguf.read_gguf(tmp_path / "vocab.gguf").meta
    tok = gguf_tokenizer.build_tokenizer(read)
    for text in held_out[:50]:
        assert tok.encode(text).ids == [sp.bos_id()] + sp.encode(text)
