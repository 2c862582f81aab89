"""Smoke tests of the bench and eval CLIs at tiny sizes: output structure, JSON
and plots (no timings are checked)."""

import json
from types import SimpleNamespace

import pytest

import mlx_kvq  # noqa: F401  (loads OpenBLAS before mlx)
from mlx_kvq.commands import bench, bench_concurrency, evaluate, run_time, schemes
from mlx_kvq import attention, models, shapes, sizing


def test_model_bench_structure(tmp_path, capsys):
    cases = bench.run(["--contexts", "40,72", "--decode-tokens", "2", "--prefill-step", "32",
                        "--kv", "k4v4", "mlx4", "--json", str(tmp_path / "b.json"),
                        "--plot", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("==== model bench")
    assert out[1].startswith("attention: ") and "memory bandwidth" in out[1]
    assert out[2].split()[:6] == ["context", "scheme", "prefill", "t/s", "x", "fp"]
    assert out[2].split()[-4:] == ["read", "GB/s", "x", "bw"]
    rows = [line.split() for line in out[4:10]]
    assert [(r[0], r[1]) for r in rows] == [(c, s) for c in ("40", "72")
                                            for s in ("fp", "k4v4", "mlx4")]
    assert all(r[3] == "1.00" for r in rows if r[1] == "fp")  # ratios to fp
    # what a step reads per second, and that over the measured bandwidth
    assert all(float(r[-2]) > 0 and 0 < float(r[-1]) < 2 for r in rows)
    assert out[10].startswith("software:")
    assert {(c.scheme, c.context) for c in cases} == {(s, c) for s in ("fp", "k4v4", "mlx4")
                                                      for c in (40, 72)}
    assert all(c.prefill_tps > 0 and c.decode_tps > 0 and c.kv_bytes > 0 for c in cases)
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["kind"] == "model" and len(saved["cases"]) == 6
    assert saved["bandwidth"] > 1e8 and saved["attention"] == attention.describe_path()
    assert (tmp_path / "bench_model.png").stat().st_size > 0


def test_attention_bench_structure(tmp_path, capsys):
    cases = bench.run(["--attention", "--contexts", "256,512", "--heads", "4", "--kv-heads",
                        "2", "--head-dim", "64", "--repeats", "2", "--kv", "k4v4", "k2v2",
                        "--mlx-bits", "4", "--plot", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("==== decode attention: 4 q heads, 2 kv heads, head_dim 64")
    kinds = ["sdpa float32", "sdpa float16", "kvq k4v4", "kvq k2v2", "mlx-lm q4 float32"]
    assert [c.kind for c in cases] == kinds * 2
    assert "x k4v4" in out[1]  # the first spec is the third reference, timed in the same rounds
    for kind, column in (("sdpa float32", 4), ("sdpa float16", 5), ("kvq k4v4", 6)):
        rows = [line.split() for line in out if kind in line]
        assert len(rows) == 2 and all(r[column] == "1.00" for r in rows)
    k4 = {c.context: c for c in cases if c.kind == "kvq k4v4"}
    # 4 fp16 sinks + 92 fp16 recent tokens + 160 quantized at 256 tokens
    assert k4[256].bytes_read == 2 * (96 * 64 * 2 * 2 + 160 * (32 + 8) * 2)
    assert (tmp_path / "bench_attention.png").stat().st_size > 0


def test_concurrency_bench_cli_structure(tmp_path, capsys, monkeypatch):
    # The bundled sample instead of parsing Austen's novels (seconds): same path.
    monkeypatch.setattr(bench, "default_text", lambda corpora: (corpora.sample_text(), "sample"))
    cases = bench.run(["--concurrency", "1,2", "--context", "48", "--max-tokens", "3",
                        "--prefill-step-size", "32", "--kv", "k4v4",
                        "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("==== concurrency bench: SmolLM2-135M-Instruct")
    assert "48-token document (sample)" in out and "prefill step size 32" in out
    fp = "fp (mlx-lm BatchKVCache float32)"
    assert [(c.chats, c.scheme) for c in cases] == [(n, s) for n in (1, 2) for s in (fp, "k4v4")]
    rows = [line for line in lines if line.lstrip()[:1].isdigit() and "  " in line]
    assert len(rows) == 4 and all(fp in r for r in rows[::2]) and "k4v4" in rows[1]
    for c in cases:
        assert c.context == 48 and c.generated == [3] * c.chats  # EOS does not stop a chat
        assert c.ttft_median > 0 and c.ttft_p95 >= c.ttft_median
        assert c.decode_tps > 0 and c.e2e_tps > 0 and c.peak > 0
    by = {(c.chats, c.scheme): c for c in cases}
    for n in (1, 2):
        assert by[n, "k4v4"].kv_bytes_per_chat < by[n, fp].kv_bytes_per_chat
    assert "over the same scheme at N=1" in out and "over the fp peer at the same N" in out
    assert any(line.split()[-2:][0] == "1.00" and line.strip().startswith("k4v4")
               for line in lines)  # k4v4 at N=1 over its own N=1 rate
    assert lines[-2].startswith("software:") and lines[-1].startswith("plot:")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["kind"] == "concurrency" and len(saved["cases"]) == 4
    d = saved["disclosure"]
    assert (d["context"], d["max_tokens"], d["prefill_step_size"], d["chats"]) == (48, 3, 32,
                                                                                   [1, 2])
    assert d["fp_peer"] == fp and "float32" in d["model"] and "mlx-lm " in saved["environment"]
    assert saved["ratios"]["k4v4"]["vs_base"]["1"] == 1.0
    assert saved["ratios"][fp]["vs_fp"]["2"] == 1.0
    assert (tmp_path / "bench_concurrency.png").stat().st_size > 0


def test_concurrency_bench_tiny_model_chats_have_their_own_text():
    from conftest import tiny_model

    model = tiny_model("llama")
    tokens = list(range(1, 400))
    prompts = bench_concurrency.chat_prompts(tokens, 3, 40)
    assert [len(x) for x in prompts] == [40] * 3 and len({tuple(x) for x in prompts}) == 3
    cases = bench_concurrency.bench_concurrency(model, tokens, ["k4v4-r32"], (1, 2), 80, 4,
                                    prefill_step=32, progress=False)
    assert [(c.chats, c.scheme) for c in cases] == [
        (n, s) for n in (1, 2) for s in ("fp (mlx-lm BatchKVCache float32)", "k4v4-r32")]
    assert all(c.generated == [4] * c.chats and c.ttft_median > 0 for c in cases)
    assert cases[1].kv_bytes_per_chat < cases[0].kv_bytes_per_chat / 2
    ratios = bench_concurrency.concurrency_ratios(cases)
    assert ratios["k4v4-r32"]["vs_base"][1] == 1.0 and set(ratios["k4v4-r32"]["vs_fp"]) == {1, 2}


def test_prefill_step_keeps_its_older_name():
    parse = bench._parser().parse_args
    assert parse([]).prefill_step_size == 2048
    assert parse(["--prefill-step-size", "64"]).prefill_step_size == 64
    assert parse(["--prefill-step", "32"]).prefill_step_size == 32
    assert "--prefill-step " not in bench._parser().format_help()


def test_needle_prompt_hides_the_key_at_depth():
    _, tokenizer = models.load()
    filler = tokenizer.encode(mlx_kvq.commands.corpus.sample_text()[:20000])
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
    sample = str(mlx_kvq.commands.corpus.SAMPLE)
    results, grid = evaluate.run(["--text", sample, "--kv", "k4v4", "mlx4", "--window", "128",
                                   "--chunk", "64",
                                   "--windows", "1", "--needle", "--needle-contexts", "160",
                                   "--needle-depths", "0.5", "--json", str(tmp_path / "e.json"),
                                   "--plot", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "passkey retrieval accuracy" in out and "==== disclosure" in out
    assert "KLD: 1 window(s) of 128 tokens, 2 schemes and fp; estimated run time" in err
    assert "(KLD estimate " in out
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


def test_run_time_counts_attention_over_the_keys_each_token_reads():
    c = run_time.Costs(per_token=1e-3, per_step=2e-3, pair=1e-6, key=3e-7)
    whole = c.prefill(1000)
    assert whole == pytest.approx(1000 * 1e-3 + 1e-6 * 1000 * 1000 / 2)
    chunks = sum(c.prefill(min(32, 1000 - i), i) for i in range(0, 1000, 32))
    assert chunks == pytest.approx(whole)  # fed in chunks or at once, the same reads
    assert c.prefill(2000) - 2 * whole == pytest.approx(1e-6 * 1000 * 1000)
    assert c.decode(10, 4096) == pytest.approx(10 * (2e-3 + 3e-7 * 4096))
    shape = SimpleNamespace(n_heads=4, n_kv_heads=2, head_dim=16, dv=16)
    one = run_time.attention_seconds(shape, 8, 256)
    assert 0 < one < 1e-3


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
    (bench, ["--concurrency", "0"], "--concurrency: '0' is not a positive integer"),
    (bench, ["--concurrency", "1,x"], "--concurrency: 'x' is not an integer"),
    (bench, ["--concurrency", "2", "--context", "0"], "--context: '0' is not a positive token"),
    (bench, ["--concurrency", "2", "--max-tokens", "1"], "--max-tokens must be at least 2"),
    (bench, ["--concurrency", "2", "--kv", "mlx4"], "--kv mlx4: mlx-lm's QuantizedKVCache has"),
    (bench, ["--concurrency", "2", "--contexts", "1K"], "--concurrency runs one --context"),
    (bench, ["--concurrency", "1,1024", "--context", "128K"],
     "--concurrency 1024 --context 131072 (+64 generated): the full-precision peer of 1024 "
     "chats needs"),
])
def test_bad_arguments_are_clear_errors(cli, argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_eval_memory_check_counts_every_cache_held_at_once():
    shape = shapes.load_shape()
    args = SimpleNamespace(kv=["k4v4", "mlx4"], window=4096, chunk=256, windows=1,
                           needle=False, needle_contexts=(512,))
    logprobs = 4 * 256 * shape.vocab_size * 4  # a chunk's float32 log-probs, 4 tensors
    need = evaluate.schemes_memory(shape, ["fp", "k4v4", "mlx4"], 4096, 256) + logprobs
    fp = schemes.Scheme("fp").kv_bytes(shape, 4096)
    # float32 reference: twice the fp16 plan; k4v4 about a sixth of it
    assert fp == 2 * sizing.kv_bytes(shape, "fp16", 4096)
    assert 0.1 < schemes.Scheme("k4v4").kv_bytes(shape, 4096) / fp < 0.2
    assert need > shape.weight_bytes + fp + logprobs
    assert evaluate.memory_problem(shape, args, need) is None
    assert "need" in evaluate.memory_problem(shape, args, need - 1)

