"""mlx_kvq under MLX's distributed engine: local ranks over the ring backend.

Random-weight models (weights scaled up so greedy decoding does not repeat
one token) are saved as model folders; each launch runs several cases
(tests/dist_worker.py) and every rank writes what it saw. A case generates
greedily sharded over the ranks and, as the reference, in one process with
the unsharded model and the same spec.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx_kvq
import mlx_kvq.shapes
import mlx_kvq.sizing
import numpy as np
import pytest

from conftest import TINY, save_model_folder, tiny_model
from mlx_kvq import distributed
from mlx_kvq.kvplan import STATS, KVPlan, LayerPlan, model_identity
from mlx_kvq.spec import KVQuantSpec

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
LAUNCH = shutil.which("mlx.launch")
PY = sys.executable
TOKENS = 16
VOCAB = 49152  # the real tokenizer's ids (the CLI encodes text)

MODELS = {  # name: (arch, overrides)
    "cli": ("llama", dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB)),
    "llama4": ("llama", dict(num_attention_heads=8, num_key_value_heads=4)),
    "llama8": ("llama", dict(num_attention_heads=8, num_key_value_heads=8)),
    "llama6": ("llama", dict(num_attention_heads=12, num_key_value_heads=6, hidden_size=192,
                                intermediate_size=384)),
    "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4)),
}


def synthetic_plan(model, seed=0) -> KVPlan:
    """A per-layer plan with random per-head statistics: mixed bits, values
    smoothed on every other layer (so each head has factors of its own)."""
    rng = np.random.default_rng(seed)
    ident = model_identity(model)
    H, D = ident["n_kv_heads"], ident["head_dim"]
    layers, stats = {}, {}
    for i in range(ident["n_layers"]):
        layers[i] = LayerPlan(4 if i % 2 else 8, (2, 4)[i % 2], "smooth" if i % 2 == 0 else "none")
        st = {}
        for kind in "kv":
            amax = rng.uniform(0.5, 8.0, (H, D)).astype(np.float32)
            st.update({f"{kind}_absmax": amax, f"{kind}_p99": amax * 0.5,
                       f"{kind}_p999": amax * 0.8, f"{kind}_absmax_rot": amax,
                       f"{kind}_outliers": np.zeros((H, D), np.int32)})
        assert set(st) == {f"{k}_{s}" for k in "kv" for s in STATS}
        stats[i] = st
    return KVPlan(KVQuantSpec.from_string("k4v4-g32-r32-s4"), layers, stats, ident,
                  alpha=0.5, disclosure={"sources": ["synthetic"], "tokens": 0})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for name, (arch, over) in MODELS.items():
        out[name] = root / name
        model = save_model_folder(out[name], arch, over)
        if name in ("llama4", "qwen2"):  # a calibrated copy
            out[f"{name}-plan"] = root / f"{name}-plan"
            shutil.copytree(out[name], out[f"{name}-plan"])
            synthetic_plan(model).save(out[f"{name}-plan"])
    return out


def _launch(n, job, tmp_path, timeout=240):
    """Run the worker on n local ranks under mlx.launch; every rank's results."""
    if LAUNCH is None:
        pytest.skip("mlx.launch not on PATH")
    job_file, out = tmp_path / "job.json", tmp_path / "out"
    out.mkdir()
    job_file.write_text(json.dumps(job))
    cmd = [LAUNCH, "--backend", "ring", "-n", str(n), "--starting-port", str(distributed.free_ports(n)),
           "--python", PY, "--", str(WORKER), str(job_file), str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    assert all(len(r) == len(job["cases"]) for r in results), run.stderr[-3000:]
    return [{c["name"]: c for c in r} for r in results]


def _case(name, model, sharding, spec=None, **kw):
    return dict(name=name, model=str(model), sharding=sharding, spec=spec, tokens=TOKENS, **kw)


# Log-probabilities, sharded vs one process. Pipeline ranks run the same
# operations: equal. Tensor ranks sum partial products in another order
# (about 1e-6 relative), and where that flips a key's quantization rounding
# these random-weight models (weights x3, chaotic) amplify it: up to 0.25
# seen. A plan applied with the wrong heads' statistics moves them by ~17.
LOGPROB_TOL = {"pipeline": 1e-4, "tensor": 1.0}


def _check_same_as_one_process(results, name, n, sharding):
    ref = results[0][name]  # rank 0 also ran the model alone
    assert len(set(ref["ref_tokens"])) > TOKENS // 3, "degenerate reference: weak test"
    assert ref["max_logprob_diff"] < LOGPROB_TOL[sharding], (name, ref["max_logprob_diff"])
    for r in range(n):
        got = results[r][name]
        assert got["tokens"] == ref["ref_tokens"], (name, r)
        assert got["logprobs"] == ref["logprobs"], (name, r)  # every rank saw the same logits
    return ref


def _check_tensor_bytes(results, name, n):
    ref = results[0][name]
    for r in range(n):
        got = results[r][name]
        assert got["heads"] == ref["ref_heads"] // n and got["layers"] == ref["ref_layers"]
        assert got["nbytes"] * n == ref["ref_nbytes"], (name, r)  # exact: same tokens, H/N
        assert got["all_nbytes"] == [got["nbytes"]] * n


def _check_pipeline_bytes(results, name, n, n_layers=4):
    base, extra = divmod(n_layers, n)
    per_layer = results[0][name]["ref_nbytes"] // n_layers
    for r in range(n):
        got = results[r][name]
        share = base + (r < extra)  # mlx-lm's even split
        assert got["layers"] == share and got["heads"] == results[0][name]["ref_heads"]
        assert got["nbytes"] == per_layer * share, (name, r)
    assert sum(results[0][name]["all_nbytes"]) == results[0][name]["ref_nbytes"]


def test_ring_backend_sums_between_local_processes(tmp_path):
    if LAUNCH is None:
        pytest.skip("mlx.launch not on PATH")
    script = tmp_path / "sum.py"
    # each rank writes its own file: the launcher relays the ranks' stdout
    # in chunks that may interleave within a line
    script.write_text("import sys, mlx.core as mx\n"
                      "g = mx.distributed.init(strict=True, backend='ring')\n"
                      "x = mx.distributed.all_sum(mx.array([g.rank() + 1.0]), stream=mx.cpu)\n"
                      "open(f'{sys.argv[1]}/rank{g.rank()}.txt', 'w').write("
                      "f'rank {g.rank()} of {g.size()} sum {x.item()}')\n")
    run = subprocess.run([LAUNCH, "--backend", "ring", "-n", "2", "--starting-port",
                          str(distributed.free_ports(2)), "--python", PY, "--", str(script),
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = sorted(f.read_text() for f in tmp_path.glob("rank*.txt"))
    assert got == ["rank 0 of 2 sum 3.0", "rank 1 of 2 sum 3.0"], run.stdout


def test_two_ranks_generate_as_one_process(folders, tmp_path):
    cases = [
        _case("llama4 tensor k4v4", folders["llama4"], "tensor", "k4v4"),
        _case("llama4 tensor k8v2", folders["llama4"], "tensor", "k8v2-g32-r32-s0"),
        _case("llama8 tensor k4v4", folders["llama8"], "tensor", "k4v4"),
        _case("qwen2 pipeline k4v4", folders["qwen2"], "pipeline", "k4v4"),
        _case("llama4 calibrated tensor", folders["llama4-plan"], "tensor"),
        _case("qwen2 calibrated pipeline", folders["qwen2-plan"], "pipeline"),
        _case("llama pipeline refused", folders["llama4"], "pipeline", "k4v4", reference=False),
    ]
    res = _launch(2, {"prompt": 150, "cases": cases}, tmp_path)
    for name in ("llama4 tensor k4v4", "llama4 tensor k8v2", "llama8 tensor k4v4",
                 "llama4 calibrated tensor"):
        _check_same_as_one_process(res, name, 2, "tensor")
        _check_tensor_bytes(res, name, 2)
    for name in ("qwen2 pipeline k4v4", "qwen2 calibrated pipeline"):
        _check_same_as_one_process(res, name, 2, "pipeline")
        _check_pipeline_bytes(res, name, 2)
    # The planner's per-rank arithmetic is what the ranks' caches hold.
    for name, folder, sharding in (("llama4 tensor k4v4", "llama4", "tensor"),
                                   ("qwen2 pipeline k4v4", "qwen2", "pipeline")):
        shape = mlx_kvq.shapes.load_shape(str(folders[folder]))
        for r in range(2):
            part = mlx_kvq.sizing.rank_shape(shape, sharding, 2, r)
            got = res[r][name]
            assert mlx_kvq.sizing.kv_bytes(part, "k4v4", got["offset"]) == got["nbytes"]
    # The calibrated plan applies per layer (its specs) and per head (smoothing).
    plan = res[0]["llama4 calibrated tensor"]
    assert plan["specs"] == ["k8v2-g32-r32-s4", "k4v4-g32-r32-s4"] * 2
    assert plan["smoothed"] == [True, False, True, False]
    assert res[1]["qwen2 calibrated pipeline"]["specs"] == ["k8v2-g32-r32-s4",
                                                            "k4v4-g32-r32-s4"]
    assert res[0]["qwen2 calibrated pipeline"]["smoothed"] == [True, False]  # layers 2, 3
    refused = res[0]["llama pipeline refused"]["refused"]
    assert "ShardingError" in refused and "'llama'" in refused and "qwen2" in refused
    assert "--sharding tensor" in refused


def test_three_ranks(folders, tmp_path):
    cases = [
        _case("llama6 tensor k4v4", folders["llama6"], "tensor", "k4v4"),
        _case("qwen2 pipeline k4v4", folders["qwen2"], "pipeline", "k4v4"),
        _case("llama4 over 3 refused", folders["llama4"], "tensor", "k4v4", reference=False),
    ]
    res = _launch(3, {"prompt": 150, "cases": cases}, tmp_path)
    _check_same_as_one_process(res, "llama6 tensor k4v4", 3, "tensor")
    _check_tensor_bytes(res, "llama6 tensor k4v4", 3)
    _check_same_as_one_process(res, "qwen2 pipeline k4v4", 3, "pipeline")
    _check_pipeline_bytes(res, "qwen2 pipeline k4v4", 3)  # layers 2, 1, 1
    refused = res[0]["llama4 over 3 refused"]["refused"]
    assert "8 attention heads do not divide among 3 ranks" in refused
    assert "pipeline" not in refused  # llama has no pipeline in mlx-lm


def test_calibrated_plan_slices_per_head():
    """A rank's slice of a plan is its heads' statistics (the smoothing
    factors of head h are those of the whole plan's head h)."""
    model = tiny_model("llama", num_key_value_heads=2)
    plan = synthetic_plan(model)
    for rank in range(2):
        shard = distributed.shard_of("tensor", rank, 2, 2, 2)
        part = distributed.shard_plan(plan, shard)
        assert np.array_equal(part.v_smooth(0), plan.v_smooth(0)[rank:rank + 1])
        assert part.model["n_kv_heads"] == 1
    shard = distributed.shard_of("pipeline", 0, 2, 2, 2, start=1, end=2)
    part = distributed.shard_plan(plan, shard)
    assert list(part.layers) == [0] and part.spec(0) == plan.spec(1)


def test_refusals_name_what_is_supported():
    archs = distributed.shardable_architectures()
    assert {"llama", "qwen2", "qwen3"} <= set(archs["tensor"])
    assert {"qwen2", "deepseek_v3"} <= set(archs["pipeline"]) and "llama" not in archs["pipeline"]
    assert "gpt2" not in archs["tensor"] + archs["pipeline"]
    shape = mlx_kvq.shapes.model_shape(dict(TINY["qwen2"], model_type="qwen2"))
    with pytest.raises(distributed.ShardingError, match="4 kv heads do not divide among 3 "
                       "ranks.*or --sharding pipeline"):
        distributed.check_shardable(replace(shape, n_heads=6, n_layers=4), "tensor", 3)
    with pytest.raises(distributed.ShardingError, match="2 layers cannot give each of 3"):
        distributed.check_shardable(shape, "pipeline", 3)
    import mlx_lm.models.gpt2 as gpt2
    with pytest.raises(distributed.ShardingError, match="cannot shard architecture 'gpt2' "
                       "with --sharding tensor; mlx-lm tensor-shards: .*llama"):
        distributed.check_shardable(shape, "tensor", 2, gpt2.__file__)


def _spawn_ranks(n, job, tmp_path):
    """Ranks started directly (as mlx.launch starts them, without its
    supervision), so what the survivors do on their own is seen."""
    job_file, out = tmp_path / "job.json", tmp_path / "out"
    out.mkdir()
    job_file.write_text(json.dumps(job))
    procs = []
    for ring in distributed.local_ranks(n, tmp_path):
        env = dict(os.environ, **ring)
        procs.append(subprocess.Popen([PY, str(WORKER), str(job_file), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=HERE))
    return procs


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_lost_rank_ends_the_others(folders, tmp_path, how):
    """Rank 1 dies (SIGKILL: its sockets close) or freezes (SIGSTOP: they stay
    open and silent) after a few tokens; rank 0 exits on its own with an
    error naming rank 1, within a bounded time, instead of hanging."""
    timeout = 2.0
    case = _case("die", folders["cli"], "tensor", "k4v4", reference=False,
                 timeout=timeout, die={"rank": 1, "after": 3, "signal": how})
    case["tokens"] = 200
    t0 = time.monotonic()
    procs = _spawn_ranks(2, {"prompt": 20, "cases": [case]}, tmp_path)
    try:
        _, err = procs[0].communicate(timeout=120)
        assert time.monotonic() - t0 < 60  # loading, 3 tokens, then at most the limit
        assert procs[0].returncode == distributed.EXIT_LOST, err[-2000:]
        assert "error: rank 0 of 2" in err and "rank 1" in err
        assert ("lost the connection" if how == "SIGKILL" else "no progress") in err
        if how == "SIGSTOP":  # the watchdog: within its limit of the last token
            assert "limit 2 s" in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.communicate()
    assert procs[1].returncode == -signal.SIGKILL


def test_generate_cli_under_mlx_launch(folders, tmp_path, capsys):
    """`mlx_kvq.generate --sharding tensor` on 2 ranks prints what one process
    prints, once (rank 0), with each rank's cache bytes and the total."""
    if LAUNCH is None:
        pytest.skip("mlx.launch not on PATH")
    from mlx_kvq.commands import generate

    args = ["--model", str(folders["cli"]), "--kv", "k4v4",
            "--prompt", "Tell me about the sea", "--max-tokens", "16"]
    generate.main(args)  # one process: this one
    one = capsys.readouterr()
    run = subprocess.run([LAUNCH, "--backend", "ring", "-n", "2", "--starting-port",
                          str(distributed.free_ports(2)), "--python", PY, "--", "-m", "mlx_kvq.commands.generate",
                          *args, "--sharding", "tensor"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "error" not in run.stderr, run.stderr[-3000:]
    text = one.out.split("==== KV report")[0]
    assert run.stdout.startswith(text) and run.stdout.count("==== KV report") == 1
    assert len(set(text.split())) > 3
    one_bytes = next(l for l in one.out.splitlines() if l.startswith("cache bytes:"))
    mb = float(one_bytes.split()[2])
    ranks = [l for l in run.stdout.splitlines() if l.startswith("rank ")]
    assert [l.split(":")[0] for l in ranks] == ["rank 0", "rank 1"]
    for line in ranks:
        assert f"cache {mb / 2:.2f} MB" in line or f"cache {mb / 2 + 0.005:.2f} MB" in line \
            or f"cache {mb / 2 - 0.005:.2f} MB" in line, (line, mb)
    assert "kv heads 0-1 of every layer" in ranks[0] and "kv heads 2-3" in ranks[1]
    total = next(l for l in run.stdout.splitlines() if l.startswith("all 2 ranks:"))
    assert f"cache {mb:.2f} MB" in total


@pytest.mark.slow
def test_bench_ranks_runs_both_sides(folders, tmp_path):
    """mlx_kvq.bench_ranks: one process, then 2 ranks, in one run; each rank
    holds half the one process's KV cache."""
    out = tmp_path / "b.json"
    run = subprocess.run([PY, "-m", "mlx_kvq.commands.bench_ranks", "--model", str(folders["cli"]),
                          "--ranks", "2", "--context", "256", "--decode-tokens", "4",
                          "--repeats", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    d = json.loads(out.read_text())
    for s in ("fp", "k4v4"):
        ref = d["one_process"]["cases"][s][0]
        ranks = d["sharded"]["cases"][s]
        assert len(ranks) == 2 and all(r["kv_bytes"] * 2 == ref["kv_bytes"] for r in ranks)
        assert all(r["decode_tps"] > 0 and r["weights"] < ref["weights"] for r in ranks)
    assert "rank 1 of 2" in run.stdout
