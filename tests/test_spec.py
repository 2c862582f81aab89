import pytest

from mlx_kvq import PRESETS, KVQuantSpec


def test_defaults_and_label_round_trip():
    for name, spec in PRESETS.items():
        assert KVQuantSpec.from_string(str(spec)) == spec, name
    s = KVQuantSpec.from_string("k4v2-g64-r128-s8-rot")
    assert (s.k_bits, s.v_bits, s.group_size, s.residual, s.sinks, s.rotate) == (
        4, 2, 64, 128, 8, True)
    assert str(s) == "k4v2-g64-r128-s8-rot"
    assert KVQuantSpec.from_string("k16v4").k_bits is None
    assert KVQuantSpec.from_string("k4v4-ktok").key_axis == "token"
    assert KVQuantSpec.from_string("k4v4", group_size=64).group_size == 64


@pytest.mark.parametrize("kwargs, field", [
    (dict(k_bits=7), "k_bits"),
    (dict(v_bits=1), "v_bits"),
    (dict(group_size=48), "group_size"),
    (dict(key_axis="head"), "key_axis"),
    (dict(residual=-1), "residual"),
    (dict(sinks=2.5), "sinks"),
    (dict(group_size=64, residual=32), "residual"),
])
def test_invalid_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KVQuantSpec(**kwargs)


def test_residual_free_for_token_keys():
    KVQuantSpec(key_axis="token", group_size=64, residual=10)


def test_validate_for_head_dim():
    with pytest.raises(ValueError, match="group_size=128 does not divide head_dim=96"):
        KVQuantSpec(group_size=128, residual=128).validate_for(96)
    with pytest.raises(ValueError, match="rotate"):
        KVQuantSpec(rotate=True).validate_for(96)
    KVQuantSpec(rotate=True).validate_for(128)
    # Groups split only what they quantize: channel keys group along tokens.
    KVQuantSpec(k_bits=4, v_bits=None).validate_for(80)
    with pytest.raises(ValueError, match="group_size=32 does not divide head_dim=80"):
        KVQuantSpec(k_bits=4, v_bits=None, key_axis="token").validate_for(80)
    with pytest.raises(ValueError, match="does not divide v_head_dim=80"):
        KVQuantSpec().validate_for(128, 80)
    with pytest.raises(ValueError, match="power-of-two v_head_dim"):
        KVQuantSpec(rotate=True).validate_for(128, 96)


@pytest.mark.parametrize("text", ["k9v4", "q4", "k4v4-x3", "k4v4-g", ""])
def test_unparsable(text):
    with pytest.raises(ValueError):
        KVQuantSpec.from_string(text)


@pytest.mark.parametrize("text, field", [
    ("k4v4-g32-g64", "group_size is given twice"),
    ("k4v4-rot-rot", "rotate is given twice"),
    ("k4v4-s" + "9" * 5000, "sinks=999999999999... is out of range"),
    ("k\u0664v4", "cannot parse"),  # digits are ASCII
])
def test_ambiguous_or_absurd_labels_refused(text, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        KVQuantSpec.from_string(text)


def test_16_bit_specs_keep_their_options_in_the_label():
    s = KVQuantSpec.from_string("k16v16-g64-r5-s0")
    assert str(s) == "k16v16-g64-r5-s0" and KVQuantSpec.from_string(str(s)) == s
    assert str(KVQuantSpec(k_bits=None, v_bits=None)) == "k16v16"
    with pytest.raises(ValueError, match="k_bits=4.0"):
        KVQuantSpec(k_bits=4.0)
    with pytest.raises(ValueError, match="rotate"):
        KVQuantSpec(rotate=1)


def test_outlier_channels_and_value_groups_in_labels():
    s = KVQuantSpec.from_string("k3v3-o8-vg64-rot")
    assert (s.k_outliers, s.v_group, s.value_group, s.group_size) == (8, 64, 64, 32)
    assert str(s) == "k3v3-g32-r64-s4-rot-o8-vg64"
    assert KVQuantSpec.from_string(str(s)) == s == KVQuantSpec.from_dict(s.to_dict())
    assert "8 outlier channels per head at 4-bit" in s.describe() and "(group 64)" in s.describe()
    old = {k: v for k, v in s.to_dict().items() if k not in ("k_outliers", "v_group")}
    assert KVQuantSpec.from_dict(old) == KVQuantSpec.from_string("k3v3-rot")  # older specs load
    with pytest.raises(ValueError, match="k_bits of at most 5"):
        KVQuantSpec.from_string("k6v4-o8")
    with pytest.raises(ValueError, match="per channel"):
        KVQuantSpec.from_string("k3v3-ktok-o8")
    with pytest.raises(ValueError, match="v_group=48"):
        KVQuantSpec(v_group=48)
    with pytest.raises(ValueError, match="v_group=128 does not divide head_dim=64"):
        KVQuantSpec.from_string("k4v4-vg128").validate_for(64)
    with pytest.raises(ValueError, match="fewer than head_dim=64"):
        KVQuantSpec.from_string("k4v4-o64").validate_for(64)
