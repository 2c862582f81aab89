"""Calibration below 4 bits: outlier key channels and value groups chosen
per layer with the widths, at no more bytes than the uniform spec of the
target; each layer's key channel order baked, checked and given to the
caches; plans made before these options load as they did."""

import json
import shutil
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import save_config, save_model

import mlx_kvq
from mlx_kvq import kvplan as K
from mlx_kvq import sizing
from mlx_kvq.converters import calibrate as C
from mlx_kvq.converters import choose
from mlx_kvq.files import sha256_file
from mlx_kvq.spec import parse_spec

from conftest import TINY, tiny_model

LAYERS = 3


@pytest.fixture(scope="module")
def lowbits(tmp_path_factory):
    """A tiny llama calibrated at 3 code bits with every option in play."""
    folder = tmp_path_factory.mktemp("lowbits")
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    save_model(folder, model)
    save_config(dict(TINY["llama"], model_type="llama", num_hidden_layers=LAYERS),
                folder / "config.json")
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 512, 256) for _ in range(3)]
    plan = C.calibrate(model, windows, target_bits=3.0, bits=(2, 3, 4), chunk=64,
                       progress=False)
    plan.save(folder)
    return folder, model, plan


def test_allocate_weighs_options_by_their_bits():
    """Outliers (an eighth of a bit) pay on the layer whose keys need them;
    a value group of 64 saves half a bit; options that do not lower the KLD
    are not bought."""
    opts = {"k2": 2.0, "k2-o8": 2.125, "k3": 3.0, "v2": 2.0, "v2-vg64": 1.5, "v3": 3.0}
    sens = {(0, "k"): {"k2": 1.0, "k2-o8": 0.2, "k3": 0.2},
            (0, "v"): {"v2": 0.011, "v2-vg64": 0.011, "v3": 0.011},
            (1, "k"): {"k2": 0.05, "k2-o8": 0.05, "k3": 0.05},
            (1, "v"): {"v2": 0.3, "v2-vg64": 0.31, "v3": 0.1}}
    cost = lambda t, o: opts[o]  # noqa: E731
    chosen = choose.allocate(sens, None, 2.5, cost)
    assert chosen == {(0, "k"): "k2-o8", (0, "v"): "v2-vg64", (1, "k"): "k2",
                      (1, "v"): "v3"}
    # without the cheap options the same KLD costs more bits
    plain = {t: {o: v for o, v in s.items() if o in ("k2", "k3", "v2", "v3")}
             for t, s in sens.items()}
    worse = choose.allocate(plain, None, 2.5, cost)
    kld = lambda c: sum(sens[t][o] for t, o in c.items())  # noqa: E731
    bits = lambda c: sum(opts[o] for o in c.values())  # noqa: E731
    assert kld(chosen) <= kld(worse) and bits(chosen) < bits(worse) <= 2.5 * 4


def test_key_order_by_range_and_sensitivity():
    rng = np.array([[1.0, 4.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0]])
    assert choose.key_order(rng).tolist() == [[1, 3, 2, 0], [3, 0, 1, 2]]
    weight = np.array([[100.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert choose.key_order(rng, weight).tolist() == [[0, 1, 3, 2], [3, 0, 1, 2]]


def test_options_that_fit():
    base = parse_spec("k4v4")
    keys = choose.key_options(base, (2, 4, 8), (0, 8, 64), 64)
    assert [(s.k_bits, s.k_outliers) for s in keys] == [(2, 0), (2, 8), (4, 0), (4, 8),
                                                         (8, 0)]
    assert choose.value_groups(base, (32, 64, 128), 64) == [None, 64]
    assert choose.value_groups(parse_spec("k4v4-g64"), (32,), 64) == [32, None]
    # a base with a value group of its own: that group, never the key group
    own = parse_spec("k4v4-g128-vg64-r128")
    assert choose.value_groups(own, (32,), 64) == [32, 64]
    assert choose.value_cost(own, replace(own, v_bits=3)) == 3.0
    assert choose.value_cost(own, replace(own, v_bits=3, v_group=32)) == 3.5


def test_plan_chooses_new_options_within_the_uniform_bytes(lowbits):
    """The random model's plan uses outlier channels or value groups, and
    holds no more bytes than the uniform k4v2 / k3v3 at a long context."""
    _, model, plan = lowbits
    specs = [plan.spec(i) for i in range(LAYERS)]
    assert any(s.k_outliers for s in specs) or any(s.v_group for s in specs)
    assert plan.average_bits <= 3.0 + 1e-9
    H, D, T = 2, 64, 8192
    got = sum(sizing.layer_bytes(s, T, H, D) for s in specs)
    for uniform in ("k4v2", "k3v3"):
        assert got <= LAYERS * sizing.layer_bytes(parse_spec(uniform), T, H, D)
    m = plan.measurements
    assert m["plan_kld"] <= m["uniform_kld"] or m["kept"].startswith("uniform")


def test_key_order_baked_loaded_and_given_to_caches(lowbits, tmp_path):
    folder, model, plan = lowbits
    outl = [i for i in plan.layers if plan.layers[i].k_outliers]
    if not outl:
        pytest.skip("the plan chose no outlier channels")
    loaded = K.load_plan(folder, model)
    assert loaded.layers == plan.layers
    for i in outl:
        assert np.array_equal(loaded.k_order[i], plan.k_order[i])
        want = choose.key_order(choose.stat_range(plan.stats[i]))
        assert sorted(loaded.k_order[i][0]) == list(range(64))
        assert want.shape == loaded.k_order[i].shape
    model.kvq_plan = loaded
    cache = mlx_kvq.make_prompt_cache(model)
    for i, c in enumerate(cache):
        assert c.spec == plan.spec(i)
        if i in outl:
            assert np.array_equal(np.array(c.k_order), plan.k_order[i])
            lim = np.array(c.calibration.k_limit)  # limits in stored channel order
            amax = np.take_along_axis(plan.stats[i]["k_absmax"], plan.k_order[i], axis=-1)
            assert np.allclose(lim, amax * (1 + K.LIMIT_MARGIN))
    tokens = mx.random.randint(0, 512, (1, 160), key=mx.random.key(5))
    mx.eval(model(tokens, cache=cache))
    assert all(c.drift_checked for c in cache)
    del model.kvq_plan


def _reseal(folder, edit):
    d = json.loads((folder / K.PLAN_FILE).read_text())
    d.pop(K.SEAL)
    edit(d)
    (folder / K.PLAN_FILE).write_text(json.dumps(K.sealed(d)))


def test_a_damaged_key_order_is_refused(lowbits, tmp_path):
    folder, model, plan = lowbits
    outl = [i for i in plan.layers if plan.layers[i].k_outliers]
    if not outl:
        pytest.skip("the plan chose no outlier channels")
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    arrays = dict(mx.load(str(dst / K.SCALES_FILE)))
    order = np.array(arrays[f"layers.{outl[0]}.k_order"])
    order[0, 0] = order[0, 1]  # a channel twice, another never
    arrays[f"layers.{outl[0]}.k_order"] = mx.array(order)
    mx.save_safetensors(str(dst / K.SCALES_FILE), arrays)
    _reseal(dst, lambda d: d["scales"].update(sha256=sha256_file(dst / K.SCALES_FILE)))
    with pytest.raises(K.KVPlanError, match="k_order is not an order"):
        K.load_plan(dst, model)


def test_plans_made_before_load_as_they_did(lowbits, tmp_path):
    """A plan of widths only, its JSON without the new fields (as written
    before): no new tensors, the same specs, no key channel order."""
    folder, model, plan = lowbits
    dst = tmp_path / "old"
    shutil.copytree(folder, dst)
    old = K.KVPlan(plan.base, {i: K.LayerPlan(p.k_bits, p.v_bits, p.values)
                               for i, p in plan.layers.items()},
                   plan.stats, plan.model, plan.alpha, plan.target_bits,
                   measurements={"kept": "plan"})
    old.save(dst)
    arrays = mx.load(str(dst / K.SCALES_FILE))
    assert not any(n in ("plan.k_outliers", "plan.v_group") or "k_order" in n for n in arrays)

    def strip(d):
        for e in d["layers"]:
            e.pop("k_outliers"), e.pop("v_group")
    _reseal(dst, strip)
    loaded = K.load_plan(dst, model)
    assert [loaded.spec(i) for i in range(LAYERS)] == [old.spec(i) for i in range(LAYERS)]
    assert all(not s.k_outliers and s.v_group is None
               for s in (loaded.spec(i) for i in range(LAYERS)))
    assert loaded.k_order == {}


def test_no_new_options_when_asked_for_none():
    model = tiny_model("llama", num_hidden_layers=2)
    windows = [np.random.default_rng(2).integers(0, 512, 192)]
    plan = C.calibrate(model, windows, target_bits=3.0, bits=(2, 4), transforms=("none",),
                       chunk=64, progress=False, outliers=(0,), v_groups=(32,))
    assert all(p.k_outliers == 0 and p.v_group is None for p in plan.layers.values())
    assert plan.k_order == {}


def test_a_base_whose_key_group_is_wider_than_the_head():
    """Per-channel keys in groups of 128 tokens, values in groups of 64 on
    head_dim 64: every value option keeps a group that divides the head,
    the plan's layers without a group of their own read the base's, and the
    plan holds no more bytes than the uniform spec of its target."""
    model = tiny_model("llama", num_hidden_layers=2)
    windows = [np.random.default_rng(3).integers(0, 512, 640)]
    base = parse_spec("k4v4-g128-vg64-r128-s4")
    plan = C.calibrate(model, windows, target_bits=3.0, bits=(2, 3, 4), base=str(base),
                       transforms=("none",), chunk=64, progress=False, outliers=(0,),
                       v_groups=(32,))
    specs = [plan.spec(i) for i in range(2)]
    assert all(s.value_group in (32, 64) and s.group_size == 128 for s in specs)
    assert plan.average_bits <= 3.0 + 1e-9
    assert K.LayerPlan(3, 3).v_group is None
    plan.layers[0] = replace(plan.layers[0], v_group=None)
    assert plan.spec(0).value_group == 64
    H, D, T = 2, 64, 8192
    got = sum(sizing.layer_bytes(s, T, H, D) for s in specs)
    assert got <= 2 * sizing.layer_bytes(replace(base, k_bits=3, v_bits=3), T, H, D)


def test_key_options_from_channel_errors_equal_a_cache_of_each():
    """Keys per channel are quantized channel by channel: an outlier
    option's estimate from the per-channel errors at two widths equals the
    estimate through a cache of that spec with the order."""
    from mlx_kvq.converters.sensitivity import Fisher, squared_gradients

    model = tiny_model("llama", num_hidden_layers=2)
    tokens = np.random.default_rng(3).integers(0, 512, 200)
    kv = {}
    from mlx_kvq.converters.passes import RecordingCache

    caches = [RecordingCache(lambda k, v, i=i: kv.setdefault(i, []).append((k, v)))
              for i in range(2)]
    model(mx.array(tokens)[None], cache=caches)
    kv = {i: tuple(mx.concatenate(x, axis=2) for x in zip(*parts)) for i, parts in kv.items()}
    fisher = Fisher([(kv, squared_gradients(model, mx.array(tokens), kv))], 64)
    order = choose.key_order(np.random.default_rng(4).random((2, 64)))
    specs = choose.key_options(parse_spec("k4v4-r0"), (2, 3), (0, 8, 32), 64)
    fast = fisher.key_options(1, specs, order)
    for k in specs:
        direct = fisher.layer(1, k, None, order)
        assert fast[str(k)] == pytest.approx(direct, rel=1e-4), k
    assert fast[str(specs[1])] < fast[str(specs[0])]  # outliers lower the error


def test_outlier_counts_on_the_command_line_include_none(capsys):
    """--outliers takes 0 (no outlier channels) among its counts, as its
    default does; a negative or non-integer count is refused by name."""
    with pytest.raises(SystemExit):  # parsed, then refused for the target
        C.main(["--outliers", "0,16,48", "--target-bits", "9"])
    assert "target 9.0 bits is outside the options" in capsys.readouterr().err
    for bad in ("0,-8", "0,x"):
        with pytest.raises(SystemExit):
            C.main(["--outliers", bad])
        assert "argument --outliers" in capsys.readouterr().err
