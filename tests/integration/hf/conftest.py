"""Fixtures of the Hugging Face tests: never touch the network; tiny random models per module."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# name: (transformers config class, overrides) — one per supported architecture and the
# variants that change the mapping (GQA and MQA, tied embeddings, biases, RoPE base, head dim).
IMPORT_CASES = {
    "llama": ("LlamaConfig", {}),
    "llama-tied-mqa": ("LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 1, "rope_theta": 50000.0}),
    "llama-biases": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True, "rms_norm_eps": 1e-5}),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),
    "cohere": ("CohereConfig", {"logit_scale": 0.25, "layer_norm_eps": 1e-5}),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Each case of ``IMPORT_CASES`` saved as a Hugging Face folder: name -> (folder, model)."""
    from support.hf import make_hf_model

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, (cls, overrides)) in enumerate(IMPORT_CASES.items()):
        folder = str(root / name)
        out[name] = (folder, make_hf_model(folder, cls, seed=i, **overrides))
    return out
