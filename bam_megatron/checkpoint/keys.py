"""The names of a checkpoint's tensors (megatron-core's global keys), one place for every layer
that reads or writes checkpoints (no torch import).

Homogeneous decoder layers are stored stacked: a key ``decoder.layers.<name>`` holds ``[L, ...]``;
expert tensors add an axis after the layer axis. Checkpoints written with Transformer Engine
layers name the fused norms after the following linear layer; ``canonical_key`` maps them to the
local layers' names (``input_layernorm`` / ``pre_mlp_layernorm``).
"""

from __future__ import annotations

LAYER_PREFIX = "decoder.layers."
ATTN_QKV = "self_attention.linear_qkv."
ATTN_PROJ = "self_attention.linear_proj."
MLP_FC = ("mlp.linear_fc1.", "mlp.linear_fc2.")
EXPERTS_PREFIX = "mlp.experts.experts."
ATTN_ROUTER_KEY = LAYER_PREFIX + "self_attention.router.weight"
FFN_ROUTER_KEY = LAYER_PREFIX + "mlp.router.weight"
SHARED_PREFIX = "mlp.shared_experts."
SHARED_FC1_KEY = LAYER_PREFIX + SHARED_PREFIX + "linear_fc1.weight"
# The Nexus router (model/nexus_router.py): fixed domain embeddings and a learned projection.
NEXUS_DOMAIN_KEY = LAYER_PREFIX + "mlp.router.domain_embeddings"  # [L, N, D]
NEXUS_FC1_KEY = LAYER_PREFIX + "mlp.router.projection_fc1.weight"  # [L, 2P, D]
NEXUS_FC2_KEY = LAYER_PREFIX + "mlp.router.projection_fc2.weight"  # [L, d, P]

# Transformer Engine fuses the norms into the following linear layer; its checkpoints name them
# after that layer. Keys below are relative to ``decoder.layers.``.
TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}

# The tensors of a dense seed the mapping knows (local-layer names). Per layer, relative to
# ``decoder.layers.`` (global shape ``[L, ...]``):
DENSE_LAYER_NAMES = (
    "input_layernorm.weight",  # [L, d]
    "input_layernorm.bias",  # [L, d] (LayerNorm)
    "pre_mlp_layernorm.weight",  # [L, d] (sequential blocks only)
    "pre_mlp_layernorm.bias",
    "self_attention.linear_qkv.weight",  # [L, G(r+2)dh, d]
    "self_attention.linear_qkv.bias",  # [L, G(r+2)dh] (--add-bias-linear or --add-qkv-bias)
    "self_attention.q_layernorm.weight",  # [L, dh] (--qk-layernorm)
    "self_attention.q_layernorm.bias",
    "self_attention.k_layernorm.weight",
    "self_attention.k_layernorm.bias",
    "self_attention.linear_proj.weight",  # [L, d, H dh]
    "self_attention.linear_proj.bias",  # [L, d]
    "mlp.linear_fc1.weight",  # [L, F', d] (F' = 2F with SwiGLU: [gate; up])
    "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight",  # [L, d, F]
    "mlp.linear_fc2.bias",
)
# ... and outside the layer stack:
DENSE_GLOBAL_NAMES = (
    "embedding.word_embeddings.weight",  # [V, d]
    "embedding.position_embeddings.weight",  # [S, d] (learned absolute positions)
    "decoder.final_layernorm.weight",  # [d]
    "decoder.final_layernorm.bias",  # [d]
    "output_layer.weight",  # [V, d] (untied embeddings)
)


def canonical_key(key: str) -> str:
    """The local-layer name of a seed key (Transformer Engine's fused-norm names mapped to
    ``input_layernorm`` / ``pre_mlp_layernorm``); other keys are returned unchanged."""
    if key.startswith(LAYER_PREFIX):
        name = key[len(LAYER_PREFIX) :]
        if name in TE_NORM_NAMES:
            return LAYER_PREFIX + TE_NORM_NAMES[name]
    return key


def is_dense_key(key: str) -> bool:
    """True for the (canonical) keys of a dense seed that the mapping knows."""
    if key.startswith(LAYER_PREFIX):
        return key[len(LAYER_PREFIX) :] in DENSE_LAYER_NAMES
    return key in DENSE_GLOBAL_NAMES


def is_model_entry(key: str) -> bool:
    """Model weights among a checkpoint's entries (not optimizer state, RNG, extra states)."""
    return not (
        key.startswith("optimizer")
        or key.startswith("chained_")
        or key.startswith("rng_state")
        or "_extra_state" in key
        or key.startswith("rerun_state_machine")
    )
