"""mlx_kvq caches on the embedded default model with real text."""

from pathlib import Path

import mlx_kvq  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import pytest
from mlx_lm.generate import generate, stream_generate
from mlx_lm.models.cache import KVCache

from mlx_kvq.commands import corpus
from mlx_kvq import models
from mlx_kvq.commands import generate as cli
from mlx_kvq.persist import load_prompt_cache, save_prompt_cache


@pytest.fixture(scope="module")
def smol():
    return models.load()


@pytest.fixture(scope="module")
def prose(smol):
    return mx.array(smol[1].encode(corpus.sample_text())[:640])[None]


def chunked_logprobs(model, cache, tokens, chunk=128):
    outs = [model(tokens[:, i:i + chunk], cache=cache) for i in range(0, tokens.shape[1], chunk)]
    x = mx.concatenate(outs, axis=1)[0]
    return x - mx.logsumexp(x, -1, keepdims=True)


def test_k8v8_matches_fp_cache_on_prose(smol, prose):
    model = smol[0]
    ref = chunked_logprobs(model, [KVCache() for _ in model.layers], prose)
    got = {}
    for label in ("k8v8", "k2v2"):
        lp = chunked_logprobs(model, mlx_kvq.make_prompt_cache(model, label), prose)
        kld = float((mx.exp(ref) * (ref - lp)).sum(-1).mean())
        top1 = float((lp.argmax(-1) == ref.argmax(-1)).mean())
        got[label] = (kld, top1)
    assert got["k8v8"][0] < 1e-3 and got["k8v8"][1] > 0.98
    assert got["k2v2"][0] > 10 * got["k8v8"][0]  # the comparison can tell


def chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True)


def test_greedy_generation_matches_fp_for_dozens_of_tokens(smol):
    model, tok = smol
    prompt = chat(tok, "Write three sentences about the sea.")
    fp = generate(model, tok, prompt, max_tokens=48)
    q = generate(model, tok, prompt, max_tokens=48,
                 prompt_cache=mlx_kvq.make_prompt_cache(model, "k8v8"))
    assert len(tok.encode(fp)) > 30
    assert q == fp


def chat_script(model, tok, cache, turns):
    """A typical mlx-lm chat loop: one cache, each turn templates only its new message."""
    replies, offsets = [], []
    for turn in turns:
        replies.append("".join(r.text for r in stream_generate(
            model, tok, chat(tok, turn), max_tokens=20, prompt_cache=cache)))
        offsets.append(cache[0].offset)
    return replies, offsets


def test_chat_script_keeps_one_cache_across_turns(smol):
    model, tok = smol
    turns = ["What is the capital of France?", "Tell me one fact about it."]
    fp, fp_off = chat_script(model, tok, [KVCache() for _ in model.layers], turns)
    q8, q8_off = chat_script(model, tok, mlx_kvq.make_prompt_cache(model, "k8v8"), turns)
    assert q8 == fp and q8_off == fp_off and q8_off[1] > q8_off[0]
    q4, _ = chat_script(model, tok, mlx_kvq.make_prompt_cache(model, "k4v4"), turns[:1])
    assert "Paris" in q4[0]


def test_save_load_reproduces_next_token_logits(tmp_path, smol, prose):
    model = smol[0]
    cache = mlx_kvq.make_prompt_cache(model, "k4v2")
    chunked_logprobs(model, cache, prose[:, :300])
    f = tmp_path / "prompt.safetensors"
    save_prompt_cache(f, cache, model=model)
    want = model(prose[:, 300:301], cache=cache)
    got = model(prose[:, 300:301], cache=load_prompt_cache(f, model=model, spec="k4v2"))
    assert float(mx.abs(got - want).max()) < 1e-4


def test_cli_prints_text_and_kv_report(capsys):
    cli.main(["--prompt", "Name a color.", "--max-tokens", "6", "--kv", "k4v2",
              "--residual", "0", "--sinks", "0"])
    out = capsys.readouterr().out
    assert "==== KV report" in out
    assert "K 4-bit per-channel, V 2-bit per-token, group 32, residual 0" in out
    assert "calibration:  dynamic, none" in out
    assert "bits per element" in out and "tokens/s" in out


def test_cli_continues_from_saved_cache(tmp_path, capsys):
    f = str(tmp_path / "c.safetensors")
    cli.main(["--prompt", "Remember the word 'lighthouse'.", "--max-tokens", "4",
              "--save-prompt-cache", f, "--verbose", "false"])
    capsys.readouterr()
    cli.main(["--prompt", "Which word?", "--max-tokens", "4", "--prompt-cache-file", f])
    assert "tokens:" in capsys.readouterr().out
    before = Path(f).read_bytes()
    with pytest.raises(SystemExit, match="KV spec"):
        cli.main(["--prompt", "x", "--prompt-cache-file", f, "--kv", "k2v2"])
    # Too large for this machine: refused before any allocation, file kept.
    with pytest.raises(SystemExit, match=r"at most \d+ tokens fit.*--max-kv-size"):
        cli.main(["--prompt", "x", "--prompt-cache-file", f, "--max-tokens", str(10**9),
                  "--save-prompt-cache", f])
    assert Path(f).read_bytes() == before


@pytest.mark.parametrize("argv, msg", [
    (["--model", "/nonexistent/model"], "neither a local model folder"),
    (["--max-kv-size", "0"], "--max-kv-size: '0' is not a positive integer"),
    (["--kv", "k9v9"], "k_bits=9"),
    (["--k-bits", "7"], "k_bits=7"),
    (["--group-size", "48"], "group_size=48"),
    (["--kv", "k4v4", "--residual", "10"], "residual=10"),
])
def test_cli_bad_spec_is_a_clear_error(argv, msg, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--prompt", "x"] + argv)
    assert msg in capsys.readouterr().err
