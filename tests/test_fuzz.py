"""The fuzz targets (mlx_kvq.harness.fuzz) find nothing wrong, in a bounded form
(a long form under --slow), and they do fail on a deliberately broken
runtime: a perturbed dequantization, a loader that skips its checks."""

import pytest

from mlx_kvq.harness import fuzz

BOUNDED = {"cache": 25, "spec": 300, "loaders": 200}
LONG = {"cache": 1000, "spec": 5000, "loaders": 3000}


@pytest.mark.parametrize("target", sorted(BOUNDED))
def test_fuzz_target_finds_nothing(target):
    (result,) = fuzz.run(BOUNDED[target], seed=0, targets=[target])
    assert result["target"] == target and result["examples"] >= BOUNDED[target] // 2
    assert result["failures"] == []


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(LONG))
def test_fuzz_target_long(target):
    (result,) = fuzz.run(LONG[target], seed=1, targets=[target])
    assert result["failures"] == []


def test_a_perturbed_dequantization_is_caught(monkeypatch):
    from mlx_kvq import quant

    dequantize = quant.dequantize
    monkeypatch.setattr(quant, "dequantize",
                        lambda q, bits, g, dtype=None, **k: dequantize(q, bits, g) * 1.05)
    (result,) = fuzz.run(100, seed=0, targets=["cache"])
    assert result["failures"] and "off by" in result["failures"][0]


def test_loaders_without_integrity_checks_are_caught(monkeypatch):
    from mlx_kvq import persist

    monkeypatch.setattr(persist, "_digest", lambda meta, c: "same")
    (result,) = fuzz.run(1500, seed=0, targets=["loaders"])
    assert result["failures"] and "unnoticed" in result["failures"][0]


def test_unknown_target_refused():
    with pytest.raises(ValueError, match="unknown fuzz target"):
        fuzz.run(1, targets=["nope"])
