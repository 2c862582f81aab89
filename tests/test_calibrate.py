"""Calibration: plans baked into model folders, picked up by load and
make_prompt_cache, refused for another model or when damaged; smoothing;
the drift counter; the vLLM export; the command line on the default model."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import save_config, save_model

import mlx_kvq
from mlx_kvq import KVQCache
from mlx_kvq.commands import corpus
from mlx_kvq import kvplan as K
from mlx_kvq.cache import Calibration
from mlx_kvq.converters import calibrate as C
from mlx_kvq.converters import vllm_export
from mlx_kvq.files import sha256_file
from mlx_kvq.persist import load_prompt_cache, save_prompt_cache
from mlx_kvq.report import format_report, kv_stats

from conftest import TINY, tiny_model


def _default_model():
    try:
        return mlx_kvq.models.default_model_path()
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    """A tiny llama saved as a model folder, calibrated on random tokens."""
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama", num_hidden_layers=3)
    save_model(folder, model)
    save_config(dict(TINY["llama"], model_type="llama", num_hidden_layers=3),
                folder / "config.json")
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 512, 256) for _ in range(3)]
    plan = C.calibrate(model, windows, target_bits=3.0, bits=(2, 3, 4), chunk=64,
                       progress=False)
    plan.disclosure = C.disclosure(C.Workload(["random tokens"], "0" * 64, windows, 256), 64)
    plan.save(folder)
    return folder, model, plan


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_files_written(baked):
    folder, model, plan = baked
    config = json.loads((folder / "config.json").read_text())
    assert config["mlx_kvq"] == {"plan": K.PLAN_FILE, "scales": K.SCALES_FILE}
    d = json.loads((folder / K.PLAN_FILE).read_text())
    assert d["format"] == K.FORMAT and d["version"] == K.FORMAT_VERSION
    assert d["model"]["n_layers"] == 3 and d["model"]["n_kv_heads"] == 2
    assert d["model"]["head_dim"] == 64
    assert set(d["calibration"]) >= {"sources", "tokens", "sha256", "date", "tool"}
    assert [e["layer"] for e in d["layers"]] == [0, 1, 2]
    m = d["measurements"]
    s = m["sinks_chosen"]  # uniform specs are measured with the sinks chosen
    assert set(m["uniform"]) == {f"k4v2-g32-r64-s{s}", f"k3v3-g32-r64-s{s}", f"k2v4-g32-r64-s{s}"}
    assert set(m["uniform_estimate"]) == {"k4v2-g32-r64-s4", "k3v3-g32-r64-s4", "k2v4-g32-r64-s4"}
    assert set(m["sinks"]) == {"0", "4", "16"} and len(m["layers"]) == 3
    assert plan.average_bits <= 3.0
    arrays, meta = mx.load(str(folder / K.SCALES_FILE), return_metadata=True)
    assert meta["format"] == K.FORMAT
    assert arrays["plan.k_bits"].dtype == mx.int32 and arrays["plan.k_bits"].shape == (3,)
    for i in range(3):
        for kind in "kv":
            for stat in K.STATS:
                a = arrays[f"layers.{i}.{kind}_{stat}"]
                assert a.shape == (2, 64)
                assert a.dtype == (mx.int32 if stat == "outliers" else mx.float32)
            p99, p999, amax = (arrays[f"layers.{i}.{kind}_{s}"] for s in ("p99", "p999", "absmax"))
            assert mx.all(p99 <= p999).item() and mx.all(p999 <= amax).item()
        assert (f"layers.{i}.v_smooth" in arrays) == (plan.layers[i].values == "smooth")


def test_plan_beats_or_equals_uniform(baked):
    m = baked[2].measurements
    assert m["plan_kld"] <= m["uniform_kld"] or m["kept"].startswith("uniform")


def test_load_attaches_plan_and_caches_follow_it(baked, tmp_path):
    folder = _copy(baked[0], tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(_default_model() / name, folder / name)
    model, _ = mlx_kvq.load(str(folder))
    plan = model.kvq_plan
    cache = mlx_kvq.make_prompt_cache(model)
    assert [c.spec for c in cache] == [plan.spec(i) for i in range(3)]
    for i, c in enumerate(cache):
        assert c.calibration is not None
        assert (c.v_smooth is not None) == (plan.layers[i].values == "smooth")
    tokens = mx.random.randint(0, 512, (1, 200), key=mx.random.key(3))
    mx.eval(model(tokens, cache=cache))
    stats = kv_stats(cache)
    assert stats.calibration.startswith("calibrated") and "random tokens" in stats.calibration
    assert "drift:" in format_report(stats, peak=0)
    explicit = mlx_kvq.make_prompt_cache(model, "k8v8")
    assert all(str(c.spec) == "k8v8-g32-r64-s4" and c.calibration is None for c in explicit)


def test_smoothing_is_exact_in_full_precision():
    model = tiny_model("llama")
    s = mx.random.uniform(0.25, 4.0, (2, 64), key=mx.random.key(1))
    tokens = mx.random.randint(0, 512, (1, 100), key=mx.random.key(2))
    ref = model(tokens, cache=[KVCache() for _ in model.layers])
    smooth = [KVQCache("k16v16", calibration=Calibration(v_smooth=s)) for _ in model.layers]
    out = model(tokens, cache=smooth)
    assert mx.allclose(out, ref, atol=2e-3, rtol=1e-3).item()


def test_plan_for_another_model_refused(baked):
    folder = baked[0]
    with pytest.raises(K.KVPlanError, match="another model"):
        K.attach(tiny_model("llama", seed=1, num_hidden_layers=3), folder)
    with pytest.raises(K.KVPlanError, match="3 layers, this one has 2"):
        K.attach(tiny_model("llama", num_hidden_layers=2), folder)
    with pytest.raises(K.KVPlanError, match="kv heads"):
        K.attach(tiny_model("qwen3", num_hidden_layers=3), folder)
    assert K.attach(baked[1], folder) is not None


def test_corrupt_files_refused(baked, tmp_path):
    folder = _copy(baked[0], tmp_path)
    plan_file, scales = folder / K.PLAN_FILE, folder / K.SCALES_FILE
    good_plan, good_scales = plan_file.read_text(), scales.read_bytes()

    plan_file.write_text(good_plan[:-200])
    with pytest.raises(K.KVPlanError, match="corrupt"):
        K.load_plan(folder, baked[1])
    plan_file.write_text(good_plan)

    damaged = bytearray(good_scales)
    damaged[-10] ^= 0xFF
    scales.write_bytes(bytes(damaged))
    with pytest.raises(K.KVPlanError, match="sha256"):
        K.load_plan(folder, baked[1])

    # A truncated file whose hash was updated to match: unreadable, still refused.
    scales.write_bytes(good_scales[:1000])
    d = json.loads(good_plan)
    d["scales"]["sha256"] = sha256_file(scales)
    plan_file.write_text(json.dumps(d))
    with pytest.raises(K.KVPlanError, match="its sha256 differs"):  # the JSON's own seal
        K.load_plan(folder, baked[1])
    d.pop(K.SEAL)
    plan_file.write_text(json.dumps(K.sealed(d)))
    with pytest.raises(K.KVPlanError, match="corrupt"):
        K.load_plan(folder, baked[1])

    scales.unlink()
    with pytest.raises(K.KVPlanError, match="missing"):
        K.load_plan(folder, baked[1])


def test_plan_tensors_must_agree_with_json(baked, tmp_path):
    folder = _copy(baked[0], tmp_path)
    d = json.loads((folder / K.PLAN_FILE).read_text())
    d["layers"][0]["k_bits"] = 8 if d["layers"][0]["k_bits"] != 8 else 2
    d.pop(K.SEAL)
    (folder / K.PLAN_FILE).write_text(json.dumps(K.sealed(d)))
    with pytest.raises(K.KVPlanError, match="disagrees"):
        K.load_plan(folder)


@pytest.mark.parametrize("where, key, value", [
    ("calibration", None, True), ("scheme", "smoothing_alpha", "0.5"),
    ("layers", "values", "squash"), ("layers", "k_bits", 4.0), ("model", None, [])])
def test_plan_json_fields_of_wrong_types_refused(baked, tmp_path, where, key, value):
    """Found by fuzzing: a plan JSON with a field of another type loaded and
    failed later (AttributeError) or made caches of float bits."""
    folder = _copy(baked[0], tmp_path)
    d = json.loads((folder / K.PLAN_FILE).read_text())
    d.pop(K.SEAL)
    if key is None:
        d[where] = value
    elif where == "layers":
        d["layers"][0][key] = value
    else:
        d[where][key] = value
    (folder / K.PLAN_FILE).write_text(json.dumps(K.sealed(d)))
    with pytest.raises(K.KVPlanError, match=f"{where}.*is not valid"):
        K.load_plan(folder, baked[1])


def test_a_flipped_character_in_the_plan_json_is_caught(baked, tmp_path):
    """Found by fuzzing: one flipped bit in kv_plan.json (a key name, the
    base spec) loaded a different plan unnoticed."""
    folder = _copy(baked[0], tmp_path)
    text = (folder / K.PLAN_FILE).read_text()
    base = json.loads(text)["scheme"]["base"]
    (folder / K.PLAN_FILE).write_text(text.replace(f'"{base}"', f'"{base.replace("-s4", "-s5")}"'))
    with pytest.raises(K.KVPlanError, match="its sha256 differs"):
        K.load_plan(folder, baked[1])


def test_drift_counter_counts_injected_outliers(tmp_path):
    H, D, T = 2, 64, 96
    calib = Calibration(k_limit=mx.ones((H, D)), v_limit=mx.ones((H, D)), source="test")
    cache = KVQCache("k4v4-r0-s0", calibration=calib)
    keys = mx.random.uniform(-0.5, 0.5, (1, H, T, D), key=mx.random.key(0))
    values = mx.random.uniform(-0.5, 0.5, (1, H, T, D), key=mx.random.key(1))
    k_out = [(0, 3, 5), (1, 40, 0), (0, 70, 63)]
    v_out = [(1, 10, 10), (0, 90, 33)]
    for x, spots in ((keys, k_out), (values, v_out)):
        for h, t, d in spots:
            x[0, h, t, d] = 5.0
    cache.update_and_fetch(keys, values)
    assert cache.n_body == T
    assert cache.drift.tolist() == [len(k_out), len(v_out)]
    assert cache.drift_checked == H * T * D
    # Out-of-range values keep their own dynamic scales: represented, not clipped.
    k, v = cache._decode_body(0, T)
    for x, spots in ((k, k_out), (v, v_out)):
        for h, t, d in spots:
            assert abs(x[0, h, t, d].item() - 5.0) < 0.4
    f = tmp_path / "c.safetensors"
    save_prompt_cache(f, [cache])
    loaded = load_prompt_cache(f)[0]
    assert loaded.drift.tolist() == [3, 2] and loaded.drift_checked == H * T * D
    assert loaded.calibration.source == "test"


def test_allocate_gives_bits_where_they_pay():
    options = (2, 3, 4)
    sens = {(0, "k"): {2: 1.0, 3: 0.3, 4: 0.1}, (0, "v"): {2: 0.02, 3: 0.01, 4: 0.005},
            (1, "k"): {2: 0.05, 3: 0.02, 4: 0.01}, (1, "v"): {2: 0.5, 3: 0.1, 4: 0.02}}
    bits = C.allocate(sens, options, target=3.0)
    assert sum(bits.values()) / len(bits) <= 3.0
    assert bits[(0, "k")] == 4 and bits[(1, "v")] == 4 and bits[(0, "v")] == 2
    assert C.uniform_splits(3.0, options) == [(4, 2), (3, 3), (2, 4)]
    # Between averages: the largest within the target (not the narrowest width).
    assert C.uniform_splits(3.6, options) == [(4, 3), (3, 4)]
    assert C.uniform_splits(2.85, options) == [(3, 2), (2, 3)]
    assert C.uniform_splits(2.0, options) == [(2, 2)]


def test_vllm_export_format(baked, tmp_path):
    folder, _, plan = baked
    out = tmp_path / "vllm"
    vllm_export.export(folder, out)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    assert q["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "strategy": "tensor",
                                    "dynamic": False, "symmetric": True}
    assert "mlx_kvq" not in config and not (out / K.PLAN_FILE).exists()
    scales = mx.load(str(out / vllm_export.VLLM_SCALES_FILE))
    assert set(scales) == {f"model.layers.{i}.self_attn.{k}_scale"
                           for i in range(3) for k in "kv"}
    for i in range(3):
        for k in "kv":
            a = scales[f"model.layers.{i}.self_attn.{k}_scale"]
            assert a.shape == (1,) and a.dtype == mx.float32
            want = float(plan.stats[i][f"{k}_absmax"].max()) / 448.0
            assert a.item() == pytest.approx(want, rel=1e-6)
    index = json.loads((out / vllm_export.INDEX_FILE).read_text())
    assert index["weight_map"]["model.layers.2.self_attn.v_scale"] == \
        vllm_export.VLLM_SCALES_FILE
    with pytest.raises(ValueError, match="folder of its own"):
        vllm_export.export(folder, folder)


def test_default_model_end_to_end(tmp_path):
    src = _default_model()
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(SystemExit):
        C.main(["--workload", "sample"])  # the shared default folder needs --out
    out = tmp_path / "calibrated"
    C.main(["--out", str(out), "--workload", "sample", "--tokens", "256", "--window", "128",
            "--chunk", "64", "--bits", "4", "--target-bits", "4", "--transforms", "none"])
    assert sorted(p.name for p in src.iterdir()) == before
    assert "mlx_kvq" not in json.loads((src / "config.json").read_text())
    model, _ = mlx_kvq.load(str(out))
    assert model.kvq_plan.disclosure["sources"] == ["sample"]
    assert len(mlx_kvq.make_prompt_cache(model)) == 30

    # The planner sizes the baked plan as the caches hold it.
    from mlx_kvq.commands import plan
    from mlx_kvq import shapes, sizing

    rows = {str(r.spec): r for r in plan.run(["--model", str(out), "--memory", "4GB"]).rows}
    baked = rows["calibrated"].spec
    assert [*baked.specs] == [model.kvq_plan.spec(i) for i in sorted(model.kvq_plan.layers)]
    cache = mlx_kvq.make_prompt_cache(model)
    model(mx.array([list(range(1, 301))]), cache=cache)
    measured = sum(c.nbytes for c in cache)
    assert sizing.kv_bytes(shapes.load_shape(str(out)), baked, 300) == measured

    # Another folder's plan for the same model ("calibrated:<folder>" in
    # mlx_kvq.eval), with what would work said when there is none.
    from mlx_kvq.commands.schemes import Scheme, calibrations

    plain, _ = mlx_kvq.load()
    caches = Scheme(f"calibrated:{out}").validate(model=plain).make(plain)
    assert [c.spec for c in caches] == [model.kvq_plan.spec(i) for i in range(30)]
    assert all(c.calibration is not None for c in caches)
    assert f"(scheme 'calibrated:{out}')" in calibrations(plain, ["k4v4", f"calibrated:{out}"])
    assert calibrations(plain, ["k4v4"]) is None
    with pytest.raises(ValueError, match="holds no plan baked by mlx_kvq.calibrate"):
        Scheme(f"calibrated:{tmp_path}").validate()
    with pytest.raises(ValueError, match="calibrated:<folder>"):
        Scheme("calibrated").validate(model=plain)

    # The assistant uses the baked plan with no flags; an explicit --kv wins.
    from mlx_kvq.apps.assistant.engine import Engine, Settings
    from mlx_kvq.apps.assistant.store import Store

    for kv in (None, "k2v2"):
        engine = Engine(Settings(model=str(out), kv=kv), Store(tmp_path / "data"))
        engine.start()
        try:
            calibrated = [c.calibration is not None for c in engine.loaded.new_cache()]
            if kv is None:
                assert engine.loaded.cache_spec is None and all(calibrated)
                assert engine.scheme.startswith("calibrated per-layer plan")
                assert engine.specs == sorted({str(model.kvq_plan.spec(i))
                                               for i in model.kvq_plan.layers})
            else:
                assert engine.specs == ["k2v2-g32-r64-s4"] and not any(calibrated)
        finally:
            engine.stop()


def test_kjv_decoder():
    from mlx_kvq.models import cache_home

    data = [p for p in (Path("/") / corpus.KJV_FILE, cache_home() / "corpora/kjv/bible.data")
            if p.is_file()]
    if not data:
        pytest.skip("bible-kjv-text not fetched (kjv_text() fetches it with apt-get)")
    text = corpus.kjv_text()
    chapters = text.split("\n\n")
    assert len(chapters) == 1189  # chapters of the King James Bible
    assert chapters[0].startswith("In the beginning God created the heaven and the earth.")
    assert chapters[-1].rstrip().endswith("be with you all. Amen.")


def test_sliding_window_layers_are_calibrated_too():
    """gemma3_text: two sliding-window layers (window 64) and one full layer;
    the plan covers all three and the caches follow it, sliding layers as
    window caches; a plan of the full layers only (made before sliding layers
    were quantized) leaves them in full precision."""
    model = tiny_model("gemma3_text")
    windows = [np.random.default_rng(1).integers(0, 512, 128)]
    plan = C.calibrate(model, windows, target_bits=3.0, bits=(2, 4), transforms=("none",),
                       chunk=64, progress=False)
    assert set(plan.layers) == {0, 1, 2}
    assert {len(plan.measurements["layers"])} == {3}
    model.kvq_plan = plan
    cache = mlx_kvq.make_prompt_cache(model)
    assert [type(c).__name__ for c in cache] == ["KVQCache"] * 3
    assert [c.window for c in cache] == [64, 64, None]
    assert cache[2].spec == plan.spec(2)
    assert (cache[0].spec.k_bits, cache[0].spec.v_bits, cache[0].spec.sinks) == (
        plan.spec(0).k_bits, plan.spec(0).v_bits, 0)
    assert all(c.calibration is not None for c in cache)
    model(mx.array(windows[0])[None], cache=cache)
    old = C.KVPlan(plan.base, {2: plan.layers[2]}, {2: plan.stats[2]}, plan.model)
    model.kvq_plan = old
    kinds = [type(c).__name__ for c in mlx_kvq.make_prompt_cache(model)]
    assert kinds == ["RotatingKVCache", "RotatingKVCache", "KVQCache"]


@pytest.mark.parametrize("target, widths", [
    (3.0, (2, 3, 4)), (3.6, (2, 3, 4)), (2.0, (2, 3, 4)), (4.0, (2, 3, 4, 5)),
    (5.5, (2, 3, 4, 5, 6)), (6.0, (2, 3, 4, 5, 6, 8)), (8.0, (2, 3, 4, 5, 6, 8))])
def test_default_widths_reach_the_first_above_the_target(target, widths):
    assert C.default_bits(target) == widths
    assert C.check_options(target, None, None, ("none",))[1] == list(widths)


@pytest.mark.parametrize("argv, msg", [
    (["--target-bits", "9"], "target 9.0 bits is outside the options [2, 3, 4, 5, 6, 8]"),
    (["--target-bits", "5", "--bits", "2,3,4"], "target 5.0 bits is outside the options [2, 3, 4]"),
    (["--bits", "7"], "bits [7]: each must be one of"),
    (["--transforms", "none,bogus"], "transforms ['bogus']: use some of"),
    (["--v-groups", "32,48"], "value groups [48]: each must be one of"),
    (["--kv", "k4v4-g48"], "group_size=48"),
    (["--model", "/nonexistent/model"], "no model folder at /nonexistent/model"),
    (["--model", "not-a-user/not-a-model-xyz"], "neither a local model folder"),
])
def test_bad_options_refused_before_work(tmp_path, argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        C.main(["--out", str(tmp_path / "out")] + argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_calibrated_plan_in_a_batch(baked, tmp_path):
    """Per-layer specs, smoothing and drift counting hold in mlx-lm's batch
    machinery: each sequence gets its solo tokens and its own drift count."""
    from test_batch import assert_same_or_near_tie, prompts_of, solo

    folder = _copy(baked[0], tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(_default_model() / name, folder / name)
    model, tokenizer = mlx_kvq.load(str(folder))
    prompts = prompts_of([130, 170])
    r = mlx_kvq.batch_generate(model, tokenizer, prompts, max_tokens=[20, 12],
                               return_token_ids=True, return_prompt_caches=True,
                               prefill_step_size=64)
    for i, p in enumerate(prompts):
        want, gaps, alone = solo(model, p, [20, 12][i], spec=None)
        assert_same_or_near_tie(r.token_ids[i], want, gaps, f"sequence {i}")
        for got, ref in zip(r.caches[i], alone):
            assert got.spec == ref.spec and got.calibration is not None
            assert got.drift_checked == ref.drift_checked > 0


def test_interrupted_run_resumes_from_saved_statistics(tmp_path, monkeypatch):
    """A run stopped in the sensitivity phase keeps its statistics; the next
    run with the same checkpoint skips them and chooses the same plan."""
    model = tiny_model("llama", num_hidden_layers=3)
    rng = np.random.default_rng(2)
    windows = [rng.integers(0, 512, 128) for _ in range(3)]
    kw = dict(target_bits=3.0, bits=(2, 4), chunk=64, progress=False)
    whole = C.calibrate(model, windows, **kw)

    recorded = []
    reference = C.Runner.reference

    def counting(self, window, record_kv=None, keep=True):
        recorded.append(record_kv is not None)
        return reference(self, window, record_kv, keep)

    monkeypatch.setattr(C.Runner, "reference", counting)
    squared = C.squared_gradients

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "squared_gradients", stop)
    with pytest.raises(KeyboardInterrupt):
        C.calibrate(model, windows, checkpoint=tmp_path / "ck", **kw)
    assert recorded == [True] * 3 and (tmp_path / "ck" / "statistics.safetensors").is_file()
    recorded.clear()
    monkeypatch.setattr(C, "squared_gradients", squared)
    resumed = C.calibrate(model, windows, checkpoint=tmp_path / "ck", **kw)
    assert recorded == [False]  # only the sensitivity window's reference is run again
    assert resumed.layers == whole.layers and resumed.base == whole.base
    for i in whole.stats:
        for name, a in whole.stats[i].items():
            assert np.array_equal(resumed.stats[i][name], a)


class Killed(BaseException):
    """Stops a save where it stands (no handler of the code under test catches it)."""


@pytest.mark.parametrize("into", ["itself", "existing copy", "new copy"])
def test_a_save_killed_at_any_step_leaves_the_folder_loadable(baked, tmp_path, monkeypatch, into):
    """Every file-system step of baking a plan is made to fail in turn (as a
    kill would stop it there): the folder then loads with the old plan (or
    is absent, for a new copy) or with the new one, never a mix, and the next
    save leaves no staged or temporary files."""
    import os

    folder, model, plan = baked
    new = K.KVPlan(plan.base, {i: K.LayerPlan(4, 4) for i in plan.layers}, plan.stats,
                   plan.model, disclosure=plan.disclosure)
    step, calls = [None], [0]
    real = {name: getattr(os, name) for name in ("replace", "rename", "link")}

    def failing(name):
        def op(*a, **k):
            calls[0] += 1
            if calls[0] == step[0]:
                raise Killed(f"killed at step {step[0]} ({name})")
            return real[name](*a, **k)
        return op

    for name in real:
        monkeypatch.setattr(os, name, failing(name))
    n = 1
    while True:
        src = _copy(folder, tmp_path / f"run{n}")
        out = {"itself": src, "existing copy": _copy(folder, tmp_path / f"out{n}"),
               "new copy": tmp_path / f"run{n}" / "fresh"}[into]
        step[0], calls[0] = n, 0
        try:
            K.bake(new, src, out)
            finished = True
        except Killed:
            finished = False
        step[0] = None
        if into == "new copy" and not out.exists():
            assert not finished
        else:
            loaded = K.load_plan(out, model)  # loadable, and one plan or the other
            assert {i: (p.k_bits, p.v_bits) for i, p in loaded.layers.items()} in (
                {i: (p.k_bits, p.v_bits) for i, p in plan.layers.items()},
                {i: (4, 4) for i in new.layers})
        if finished:
            assert K.load_plan(out, model).layers == new.layers
            K.bake(new, src, out)  # again, over whatever a killed run left
            left = {p.name for p in out.iterdir()} - {p.name for p in folder.iterdir()}
            assert not left and not [p for p in out.parent.iterdir() if "partial" in p.name]
            break
        n += 1
    assert n >= 8  # each step of the protocol was failed once


def test_calibration_process_killed_at_random_moments(tmp_path):
    """SIGKILL the calibrate command at random moments (fixed seed): the model
    folder always loads with its old plan; the run after the kills resumes
    and bakes the new one, leaving no staged files."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "model"  # a tiny llama that reads the real tokenizer's ids
    model = tiny_model("llama", vocab_size=49152)
    save_model(folder, model)
    save_config(dict(TINY["llama"], model_type="llama", vocab_size=49152),
                folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(_default_model() / name, folder / name)
    windows = [np.random.default_rng(0).integers(0, 49152, 128)]
    K.bake(C.calibrate(model, windows, target_bits=4, bits=(4,), transforms=("none",),
                       chunk=64, progress=False), folder, folder)
    files = sorted(p.name for p in folder.iterdir())
    old = K.load_plan(folder, model)
    env = dict(os.environ, MLX_KVQ_HOME=str(tmp_path / "home"))
    cmd = [sys.executable, "-m", "mlx_kvq.converters.calibrate", "--model", str(folder),
           "--workload", "sample", "--tokens", "2048", "--window", "128", "--chunk", "64",
           "--bits", "2,4", "--transforms", "none"]
    rng = np.random.default_rng(7)
    for delay in rng.uniform(1.5, 5.0, 3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is not None:
            break  # it finished first: the new plan is in (checked below)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert K.load_plan(folder, model).layers == old.layers  # never half-written
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == files
    assert K.load_plan(folder, model).disclosure["sources"] == ["sample"]
    assert not list((tmp_path / "home" / "calibrate").glob("*/*"))  # checkpoint cleared
