"""Smoke tests of the bench and eval CLIs at tiny sizes: output structure, JSON
and plots (no timings are checked)."""

import json
from types import SimpleNamespace

import pytest

import mlx_kvq  # noqa: F401  (loads OpenBLAS before mlx)
from mlx_kvq import bench, evaluate, models, plan


def test_model_bench_structure(tmp_path, capsys):
    cases = bench.run(["--contexts", "40,72", "--decode-tokens", "2", "--prefill-step", "32",
                        "--kv", "k4v4", "mlx4", "--json", str(tmp_path / "b.json"),
                        "--plot", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("==== model bench")
    assert out[1].split()[:6] == ["context", "scheme", "prefill", "t/s", "x", "fp"]
    rows = [line.split() for line in out[3:9]]
    assert [(r[0], r[1]) for r in rows] == [(c, s) for c in ("40", "72")
                                            for s in ("fp", "k4v4", "mlx4")]
    assert all(r[3] == "1.00" for r in rows if r[1] == "fp")  # ratios to fp
    assert out[9].startswith("software:")
    assert {(c.scheme, c.context) for c in cases} == {(s, c) for s in ("fp", "k4v4", "mlx4")
                                                      for c in (40, 72)}
    assert all(c.prefill_tps > 0 and c.decode_tps > 0 and c.kv_bytes > 0 for c in cases)
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["kind"] == "model" and len(saved["cases"]) == 6
    assert (tmp_path / "bench_model.png").stat().st_size > 0


def test_attention_bench_structure(tmp_path, capsys):
    cases = bench.run(["--attention", "--contexts", "256,512", "--heads", "4", "--kv-heads",
                        "2", "--head-dim", "64", "--repeats", "2", "--kv", "k4v4", "k2v2",
                        "--mlx-bits", "4", "--plot", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("==== decode attention: 4 q heads, 2 kv heads, head_dim 64")
    kinds = ["sdpa float32", "sdpa float16", "kvq k4v4", "kvq k2v2", "mlx-lm q4 float32"]
    assert [c.kind for c in cases] == kinds * 2
    for kind, column in (("sdpa float32", 4), ("sdpa float16", 5)):
        rows = [line.split() for line in out if kind in line]
        assert len(rows) == 2 and all(r[column] == "1.00" for r in rows)
    k4 = {c.context: c for c in cases if c.kind == "kvq k4v4"}
    # 4 fp16 sinks + 92 fp16 recent tokens + 160 quantized at 256 tokens
    assert k4[256].bytes_read == 2 * (96 * 64 * 2 * 2 + 160 * (32 + 8) * 2)
    assert (tmp_path / "bench_attention.png").stat().st_size > 0


def test_needle_prompt_hides_the_key_at_depth():
    _, tokenizer = models.load()
    filler = tokenizer.encode(mlx_kvq.corpus.sample_text()[:20000])
    for depth in (0.0, 0.5, 1.0):
        ids = evaluate.needle_prompt(tokenizer, filler, 300, depth, "12345")
        assert len(ids) == 300
        text = tokenizer.decode(ids)
        pos = text.index("The pass key is 12345")
        assert text.endswith(evaluate.NEEDLE_ANSWER)
        body = text[text.index("the pass key.") + 13:text.index(evaluate.NEEDLE_QUESTION.strip())]
        share = (pos - text.index("the pass key.")) / max(1, len(body))
        assert abs(share - depth) < 0.2


def test_eval_cli_json_with_needle(tmp_path, capsys):
    sample = str(mlx_kvq.corpus.SAMPLE)
    results, grid = evaluate.run(["--text", sample, "--kv", "k4v4", "mlx4", "--window", "128",
                                   "--chunk", "64",
                                   "--windows", "1", "--needle", "--needle-contexts", "160",
                                   "--needle-depths", "0.5", "--json", str(tmp_path / "e.json"),
                                   "--plot", str(tmp_path)])
    out = capsys.readouterr().out
    assert "passkey retrieval accuracy" in out and "==== disclosure" in out
    saved = json.loads((tmp_path / "e.json").read_text())
    d = saved["disclosure"]
    assert d["weights"] == "GGUF Q4_1 dequantized to float32"
    assert d["calibration"].startswith("dynamic, none")
    assert d["schemes"]["k4v4"].startswith("K 4-bit per-channel, V 4-bit per-token, group 32")
    assert "mlx " in d["software"] and "mlx-lm " in d["software"]
    assert "1 x 128 tokens" in d["windows"] and "passkey" in d["needle"]
    assert d["corpus"].startswith(sample)
    assert set(saved["results"]) == {"k4v4", "mlx4"}
    assert saved["needle"]["accuracy"].keys() == {"fp", "k4v4", "mlx4"}
    assert all(0 <= a[0][0] <= 1 for a in saved["needle"]["accuracy"].values())
    assert grid["accuracy"]["fp"] == saved["needle"]["accuracy"]["fp"]
    assert results["k4v4"].kld_mean >= 0
    assert {p.name for p in tmp_path.glob("*.png")} == {"quality_vs_bits.png", "needle.png"}


@pytest.mark.parametrize("cli, argv, msg", [
    (evaluate, ["--window", "0"], "--window: '0' is not a positive integer"),
    (evaluate, ["--windows", "-1"], "--windows: '-1' is not a non-negative integer"),
    (evaluate, ["--kv", "k9v9"], "k_bits=9"),
    (evaluate, ["--kv", "mlx7"], "mlx-lm baseline 'mlx7': bits must be one of"),
    (evaluate, ["--needle", "--needle-depths", "0.5,2"], "between 0 and 1"),
    (evaluate, ["--text", "/nonexistent.txt"], "/nonexistent.txt"),
    (evaluate, ["--window", "50000000"], "--window 50000000:"),
    (evaluate, ["--model", "/nonexistent/model"], "neither a local model folder"),
    (bench, ["--model", "/nonexistent/model"], "neither a local model folder"),
    (bench, ["--contexts", "0"], "--contexts: '0' is not a positive token count"),
    (bench, ["--contexts", "1K", "--kv", "k9v9"], "k_bits=9"),
    (bench, ["--contexts", "64M"], "--contexts 67108864: the full-precision reference needs"),
])
def test_bad_arguments_are_clear_errors(cli, argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_eval_memory_check_counts_every_cache_held_at_once():
    shape = plan.load_shape()
    args = SimpleNamespace(kv=["k4v4", "mlx4"], window=4096, chunk=256, windows=1,
                           needle=False, needle_contexts=(512,))
    logprobs = 4 * 256 * shape.vocab_size * 4  # a chunk's float32 log-probs, 4 tensors
    need = evaluate.memory_needed(shape, ["fp", "k4v4", "mlx4"], 4096, 256) + logprobs
    fp = evaluate.Scheme("fp").kv_bytes(shape, 4096)
    # float32 reference: twice the fp16 plan; k4v4 about a sixth of it
    assert fp == 2 * plan.kv_bytes(shape, "fp16", 4096)
    assert 0.1 < evaluate.Scheme("k4v4").kv_bytes(shape, 4096) / fp < 0.2
    assert need > shape.weight_bytes + fp + logprobs
    assert evaluate.memory_problem(shape, args, need) is None
    assert "need" in evaluate.memory_problem(shape, args, need - 1)

