"""Property-based fuzzing (Hypothesis) of what the runtime takes in.

Targets, each a property Hypothesis drives with random inputs:
  cache    a KVQCache under random sequences of prefill chunks, single
           tokens, trims, save/load round trips (mlx_kvq.persist, mlx-lm's
           prompt-cache functions, state), max_kv_size eviction and sliding
           windows, against a float reference (the keys/values fed in): the
           tokens held, the offset, every held token within the spec's error
           bound, and attention over the quantized store within the bound
           that follows from it (same mask rules as the reference);
  spec     KVQuantSpec.from_string / parse_spec on arbitrary and near-valid
           strings: a spec that round-trips through its label, or a
           ValueError naming the field or the text at fault;
  loaders  prompt-cache files, calibrated-plan folders and GGUF files,
           truncated, bit-flipped or holding fields of the wrong shape, type
           or value: a clear error of the documented types, never a crash,
           never another exception, never content that differs unnoticed.

run() is the one entry point (tests/test_fuzz.py and reports call it): fixed
seed, `examples` examples per target, one dict per target with the minimal
failing example of each failure. The cache machine lives in fuzz_cache.py,
the damaged and forged files in fuzz_files.py. Tools: the runtime never
imports them.
"""

import re
import shutil
import tempfile
from pathlib import Path

from mlx_kvq.spec import PRESETS, KVQuantSpec, parse_spec
from .extras import need

need("hypothesis", "the fuzz harness (mlx_kvq.harness.fuzz)")
from hypothesis import HealthCheck, given, seed as hyp_seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.reporting import with_reporter  # noqa: E402
from hypothesis.stateful import initialize, run_state_machine_as_test  # noqa: E402

from . import fuzz_files as files  # noqa: E402
from .fuzz_cache import CacheMachine, specs  # noqa: E402


# -- spec labels -----------------------------------------------------------------

SPEC_FIELDS = ("k_bits", "v_bits", "key_axis", "group_size", "residual", "sinks", "rotate")


@st.composite
def near_labels(draw):
    """Valid labels and presets, mutated a little: a character dropped,
    added or changed, a number replaced, an option repeated or reordered."""
    label = draw(st.one_of(specs().map(str), st.sampled_from(sorted(PRESETS))))
    op = draw(st.sampled_from(["keep", "drop", "insert", "replace", "number", "repeat",
                               "swap", "case", "space"]))
    chars = st.sampled_from("kvgrs-0123456789tocabx _.,KV") | st.characters()
    if op == "drop" and label:
        i = draw(st.integers(0, len(label) - 1))
        label = label[:i] + label[i + 1:]
    elif op == "insert":
        i = draw(st.integers(0, len(label)))
        label = label[:i] + draw(chars) + label[i:]
    elif op == "replace" and label:
        i = draw(st.integers(0, len(label) - 1))
        label = label[:i] + draw(chars) + label[i + 1:]
    elif op == "number":
        num = str(draw(st.one_of(st.integers(0, 300), st.integers(-5, 10 ** 30))))
        parts = re.split(r"(\d+)", label)
        idx = [i for i, p in enumerate(parts) if p.isdigit()]
        if idx:
            parts[draw(st.sampled_from(idx))] = num
        label = "".join(parts)
    elif op in ("repeat", "swap"):
        parts = label.split("-")
        if len(parts) > 2:
            i = draw(st.integers(1, len(parts) - 1))
            if op == "repeat":
                parts.insert(i, draw(st.sampled_from(parts[1:])))
            else:
                j = draw(st.integers(1, len(parts) - 1))
                parts[i], parts[j] = parts[j], parts[i]
        label = "-".join(parts)
    elif op == "case":
        label = label.upper()
    elif op == "space":
        label = f" {label}\t"
    return label


@st.composite
def composed_labels(draw):
    """Labels put together from parts, right or wrong: bits, then options."""
    num = st.one_of(st.integers(0, 300), st.sampled_from([16, 32, 64, 128]),
                    st.integers(0, 10 ** 40)).map(str)
    bits = st.one_of(st.sampled_from(["2", "3", "4", "5", "6", "8", "16"]), num)
    option = st.one_of(st.tuples(st.sampled_from("grs"), num).map("".join),
                       st.sampled_from(["rot", "ktok", "g", "rot1", "x3", ""]))
    opts = draw(st.lists(option, max_size=5))
    return "-".join([f"k{draw(bits)}v{draw(bits)}"] + opts)


def check_label(text):
    """A valid spec that round-trips through its label, or a ValueError
    naming the offending field or text; never another exception."""
    try:
        spec = KVQuantSpec.from_string(text)
    except ValueError as e:
        msg = str(e)
        named = [f for f in SPEC_FIELDS if f in msg] or repr(text) in msg
        assert named, f"the error for {text!r} names no field nor the text: {msg}"
        return None
    assert parse_spec(text) == spec, f"parse_spec({text!r}) differs from from_string"
    keys = [re.match("[a-z]*", p).group() for p in text.strip().lower().split("-")[1:]]
    assert len(set(keys)) == len(keys), f"{text!r} gives an option twice, yet parses"
    again = KVQuantSpec.from_string(str(spec))
    assert again == spec, f"{text!r} -> {spec} -> {str(spec)!r} -> {again}"
    assert KVQuantSpec.from_dict(spec.to_dict()) == spec
    return spec


def _spec_target(examples, seed, counter):
    @given(st.one_of(st.text(), near_labels(), composed_labels()))
    def labels(text):
        counter[0] += 1
        check_label(text)

    hyp_seed(seed)(labels)
    _settings(examples)(labels)()


# -- damaged files ------------------------------------------------------------


def _loaders_target(examples, seed, counter):
    from mlx_kvq.kvplan import PLAN_FILE, SCALES_FILE, load_plan

    tmp = Path(tempfile.mkdtemp(prefix="mlx_kvq_fuzz."))
    try:
        cache_path, caches = files.cache_file(tmp)
        cache_bytes = cache_path.read_bytes()
        gguf_path = files.tiny_gguf(tmp)
        gguf_bytes = gguf_path.read_bytes()
        plan_dir = tmp / "plan"
        plan_dir.mkdir()
        model = files.plan_folder(plan_dir)
        plan = load_plan(plan_dir, model)
        plan_files = {n: (plan_dir / n).read_bytes() for n in (PLAN_FILE, SCALES_FILE)}
        header = int.from_bytes(cache_bytes[:8], "little") + 8  # safetensors' JSON header

        @given(st.data())
        def loaders(data):
            counter[0] += 1
            which = data.draw(st.sampled_from(["cache", "gguf", "plan"]), label="file")
            if which == "cache" and data.draw(st.booleans(), label="forged"):
                states = data.draw(files.forged_states(caches), label="forged")
                files.check_forged(tmp / "forged.safetensors", states, caches)
            elif which == "cache":
                kind, b = data.draw(files.damage(cache_bytes, header), label="damage")
                path = tmp / "damaged.safetensors"
                path.write_bytes(b)
                files.check_cache_file(path, caches, kind)
            elif which == "gguf":
                kind, b = data.draw(files.damage(gguf_bytes, 2048), label="damage")
                path = tmp / "damaged.gguf"
                path.write_bytes(b)
                files.check_gguf(path, tmp)
            elif data.draw(st.booleans(), label="forged"):
                forged = data.draw(files.forged_plan(plan_files), label="forged")
                try:
                    files.check_forged_plan(plan_dir, model, forged[0])
                finally:
                    for name, b in plan_files.items():
                        (plan_dir / name).write_bytes(b)
            else:
                name = data.draw(st.sampled_from(sorted(plan_files)), label="plan file")
                kind, b = data.draw(files.damage(plan_files[name], 4096), label="damage")
                (plan_dir / name).write_bytes(b)
                try:
                    files.check_plan(plan_dir, model, plan, kind)
                finally:
                    (plan_dir / name).write_bytes(plan_files[name])

        hyp_seed(seed)(loaders)
        _settings(examples)(loaders)()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- running ---------------------------------------------------------------------


def _settings(examples, **extra):
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                    print_blob=False, **extra)


def _describe(exc, lines) -> str:
    """The failure and its minimal example, in a few lines."""
    notes = [n for n in getattr(exc, "__notes__", []) if not n.startswith("You can")]
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb else ""
    text = f"{type(exc).__name__}: {exc}".strip()[:1000] + where
    example = "\n".join(line[:300] for line in (notes or lines))
    return f"{text}\n{example}".strip()[:3000]


def _cache_target(examples, seed, counter):
    machine = type("CacheFuzz", (CacheMachine,), {})
    init = machine.setup

    def counted(self, data):
        counter[0] += 1
        return init(self, data)

    machine.setup = initialize(data=st.data())(counted)
    hyp_seed(seed)(machine)
    run_state_machine_as_test(machine, settings=_settings(examples, stateful_step_count=12))


TARGETS = {"cache": _cache_target, "spec": _spec_target, "loaders": _loaders_target}


def run(examples: int = 200, seed: int = 0, targets=None) -> list:
    """Run fuzz targets (all of TARGETS by default), `examples` each, from a
    fixed seed. One dict per target: {"target", "examples" (property runs;
    after a failure they include Hypothesis' shrinking runs), "failures"
    (each failure with its minimal example)}."""
    out = []
    for name in targets or list(TARGETS):
        if name not in TARGETS:
            raise ValueError(f"unknown fuzz target {name!r}; use one of {sorted(TARGETS)}")
        counter, failures, lines = [0], [], []
        try:
            with with_reporter(lines.append):
                TARGETS[name](examples, seed, counter)
        except Exception as e:  # a property failed: Hypothesis shrank it
            failures.append(_describe(e, lines))
        out.append({"target": name, "examples": counter[0], "failures": failures})
    return out
