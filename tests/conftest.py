import importlib

import pytest

import mlx_kvq  # loads OpenBLAS before mlx
import mlx_kvq.models
import mlx.core as mx

def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the long forms of harnesses (tests marked slow)")


def pytest_report_header(config):
    from mlx_kvq import attention

    return f"mlx_kvq attention (decode): {attention.describe_path()}"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long harness, run with --slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="long harness: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Small random-weight configs of mlx-lm architectures: GQA ratios 1-4,
# head_dim 64/128/256, sliding-window layers (gemma3), tied/untied heads.
TINY = {
    "llama": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                  num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
                  vocab_size=512, head_dim=64, rope_theta=10000.0,
                  tie_word_embeddings=True),
    "qwen3": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                  num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6,
                  vocab_size=512, max_position_embeddings=4096, head_dim=128,
                  tie_word_embeddings=False, rope_theta=1e6),
    "qwen2": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                  num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6,
                  vocab_size=512),
    "gemma3_text": dict(hidden_size=256, num_hidden_layers=3, intermediate_size=512,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                        vocab_size=512, sliding_window=64, sliding_window_pattern=3,
                        query_pre_attn_scalar=256),
    # Casts attention output to the cached values' dtype.
    "phi": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                layer_norm_eps=1e-5, partial_rotary_factor=0.5),
    # head_dim only on the attention module (n_embd / n_head).
    "gpt2": dict(n_embd=128, n_head=4, n_layer=2, n_positions=1024, n_ctx=1024,
                 layer_norm_epsilon=1e-5, vocab_size=512, num_key_value_heads=4),
    # MLA with materialized keys (qk_nope + qk_rope = 64) and values of 32.
    "youtu_llm": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                      kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=32,
                      qk_nope_head_dim=32, v_head_dim=32),
    # Learned attention-sink logits, alternating sliding-window layers, MoE.
    "gpt_oss": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=128,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    vocab_size=512, rms_norm_eps=1e-5, sliding_window=64,
                    num_local_experts=4, num_experts_per_tok=2),
}


def tiny_model(arch, seed=0, **overrides):
    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    cfg = dict(TINY[arch], model_type=arch, **overrides)
    mx.random.seed(seed)
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def llama_tiny():
    return tiny_model("llama")


SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4)


def _tokenizer_source():
    try:
        return mlx_kvq.models.default_model_path()
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"default model (its tokenizer) unavailable: {e}")


def save_model_folder(folder, arch, over, seed=0):
    """A random-weight model folder with the embedded model's tokenizer
    (weights scaled up so greedy decoding does not repeat one token)."""
    import shutil

    from mlx.utils import tree_map
    from mlx_lm.utils import save_config, save_model

    cfg = dict(TINY[arch], model_type=arch, **dict(SMALL, **over))
    if arch == "llama":
        cfg["head_dim"] = 32
    model = tiny_model(arch, seed=seed, **{k: v for k, v in cfg.items() if k != "model_type"})
    model.update(tree_map(lambda p: p * 3 if p.ndim == 2 else p, model.parameters()))
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(cfg, folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(_tokenizer_source() / name, folder / name)
    return model
