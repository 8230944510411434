"""Test setup: CPU with 4 virtual devices, offline hub, f32 tiny models, single-threaded torch."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a device run sets JAX_PLATFORMS=cuda for the gpu-marked tests
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
GOLDENS = SHARED / "goldens" / "deepspec_qwen3_tiny"


def rel_err(a, b) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def tiny_qwen3_hf(
    tmp_path, *, vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffw=96, tied=False, seed=0, eos=None
):
    """Save a tiny random transformers Qwen3 (norm scales randomised away from 1) and return its folder."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=ffw,
        tie_word_embeddings=tied,
        max_position_embeddings=512,
        rope_theta=10000.0,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    folder = tmp_path / f"qwen3_{vocab}_{layers}_{heads}_{kv_heads}_{int(tied)}_{seed}"
    model.save_pretrained(folder)
    return folder, model
