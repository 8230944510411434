"""Qwen3Config: HF config.json round trips (ours and transformers'), full-size manifests, one-line field errors."""

import dataclasses

import pytest

from conversion.reader import load_manifest
from dspark_jax.configs import Qwen3Config, read_config_json
from dspark_jax.errors import DSparkError, UsageError

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
)


def _hf_dict(**changes) -> dict:
    d = {
        **TINY,
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_act": "silu",
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "max_position_embeddings": 512,
    }
    d.update(changes)
    return {k: v for k, v in d.items() if v is not ...}  # `...` deletes a field


@pytest.mark.parametrize(
    "config",
    [
        Qwen3Config(**TINY),
        Qwen3Config(
            **TINY,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=512,
            dtype="float32",
            param_dtype="float32",
        ),
        Qwen3Config(**TINY, rope_scaling=(("factor", 2.0), ("rope_type", "linear"))),
    ],
    ids=["default", "tied_f32", "linear_rope"],
)
def test_round_trip(config):
    assert Qwen3Config.from_hf_dict(config.to_hf_dict(), dtype=config.dtype, param_dtype=config.param_dtype) == config
    hash(config)  # frozen and hashable: it keys jit caches


def test_transformers_config_round_trip():
    transformers = pytest.importorskip("transformers")
    ours = Qwen3Config.from_hf_dict(_hf_dict(tie_word_embeddings=True), dtype="float32", param_dtype="float32")
    theirs = transformers.Qwen3Config(**ours.to_hf_dict())
    again = Qwen3Config.from_hf_dict(theirs.to_dict(), dtype="float32", param_dtype="float32")
    assert again == ours
    for field in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "tie_word_embeddings"):
        assert getattr(theirs, field) == getattr(ours, field)


def test_legacy_rope_fields_and_defaults():
    legacy = _hf_dict(
        rope_parameters=...,
        rope_theta=5e5,
        rope_scaling={"type": "linear", "factor": 4.0},
        num_key_value_heads=...,
        head_dim=...,
    )
    c = Qwen3Config.from_hf_dict(legacy)
    assert c.rope_theta == 5e5 and dict(c.rope_scaling) == {"rope_type": "linear", "factor": 4.0}
    assert c.num_key_value_heads == c.num_attention_heads == 4 and c.head_dim == 16  # HF defaults


@pytest.mark.parametrize("name", ["qwen3-4b", "qwen3-8b", "qwen3-14b"])
def test_full_size_manifest_configs(name):
    raw = load_manifest(name)["config"]
    c = Qwen3Config.from_hf_dict(raw)
    assert (c.hidden_size, c.num_hidden_layers, c.tie_word_embeddings) == (
        raw["hidden_size"],
        raw["num_hidden_layers"],
        raw["tie_word_embeddings"],
    )
    assert Qwen3Config.from_hf_dict(c.to_hf_dict()) == c


BAD_FIELDS = [
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_size=-64), "hidden_size"),
    (dict(num_hidden_layers="2"), "num_hidden_layers"),
    (dict(num_hidden_layers=2.0), "num_hidden_layers"),
    (dict(num_key_value_heads=3), "divisible"),
    (dict(head_dim=15), "head_dim"),
    (dict(intermediate_size=True), "intermediate_size"),
    (dict(rope_parameters={"rope_theta": -1.0, "rope_type": "default"}), "rope_theta"),
    (dict(rope_parameters={"rope_theta": "fast", "rope_type": "default"}), "rope_theta"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rms_norm_eps="tiny"), "rms_norm_eps"),
    (dict(max_position_embeddings="long"), "max_position_embeddings"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding"),
    (dict(use_sliding_window=True), "sliding"),
    (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "dynamic", "factor": 4.0}), "dynamic"),
    (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "linear"}), "factor"),
    (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "linear", "factor": 0}), "factor"),
    (dict(vocab_size=...), "vocab_size"),
    (dict(hidden_size=...), "hidden_size"),
    (dict(intermediate_size=...), "intermediate_size"),
]


@pytest.mark.parametrize(
    "changes, needle", BAD_FIELDS, ids=[f"{next(iter(c))}-{i}" for i, (c, _) in enumerate(BAD_FIELDS)]
)
def test_bad_field_is_one_line_usage_error(changes, needle):
    with pytest.raises(UsageError) as info:
        Qwen3Config.from_hf_dict(_hf_dict(**changes), "ckpt/config.json")
    msg = str(info.value)
    assert "\n" not in msg and needle in msg, msg


def test_bad_constructor_values_and_dtypes():
    with pytest.raises(UsageError, match="dtype"):
        Qwen3Config(**TINY, dtype="float16")
    with pytest.raises(UsageError, match="divisible"):
        dataclasses.replace(Qwen3Config(**TINY), num_attention_heads=6, num_key_value_heads=4)
    assert Qwen3Config(**TINY).with_dtype("float32").param_dtype == "float32"


def test_read_config_json_errors(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        read_config_json(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DSparkError) as info:
        read_config_json(str(tmp_path))
    assert "\n" not in str(info.value)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="JSON object"):
        read_config_json(str(tmp_path))
