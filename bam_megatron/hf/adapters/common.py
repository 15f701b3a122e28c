"""Mapping rules shared by the adapters: dense attention, dense FFN and the ``config.json``
fields every supported Hugging Face class reads the same way.

Our per-layer names are relative to ``decoder.layers.`` (global tensors ``[L, ...]``, here one
layer's slice); Hugging Face names are relative to ``model.layers.<i>.``.

| ours (one layer) | Hugging Face |
|---|---|
| ``self_attention.linear_qkv.weight [G(r+2)dh, d]`` (+ ``.bias``) | ``self_attn.{q,k,v}_proj.weight`` (+ ``.bias``) |
| ``self_attention.linear_proj.weight [d, H dh]`` (+ ``.bias``) | ``self_attn.o_proj.weight`` (+ ``.bias``) |
| ``self_attention.{q,k}_layernorm.weight [dh]`` | ``self_attn.{q,k}_norm.weight`` |
| ``mlp.linear_fc1.weight [2F, d]`` | ``mlp.gate_proj.weight``; ``mlp.up_proj.weight`` |
| ``mlp.linear_fc2.weight [d, F]`` | ``mlp.down_proj.weight`` |
"""

from __future__ import annotations

from typing import Optional

import torch

from bam_megatron.errors import HFError
from bam_megatron.hf import tensors as T
from bam_megatron.hf.adapters.base import Getter, HFConfig, Tensors
from bam_megatron.hf.spec import ModelSpec

QKV = "self_attention.linear_qkv."
PROJ = "self_attention.linear_proj."


def rope_perm(spec: ModelSpec, interleaved_out: bool) -> Optional[torch.Tensor]:
    """The per-head row permutation from ``spec``'s RoPE layout to the target's (None: same)."""
    if spec.rotary_interleaved == interleaved_out or spec.position_embedding_type != "rope":
        return None
    return T.rope_permutation(spec.head_dim, spec.rotary_dims, to_interleaved=interleaved_out)


def _perm(t: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    return t if perm is None else T.permute_heads(t, perm.to(t.device))


def attention_from_hf(get: Getter, spec: ModelSpec, prefix: str = "self_attn.") -> Tensors:
    """Hugging Face ``q/k/v/o_proj`` (+ biases, q/k norms) -> our dense attention tensors."""
    g, dh = spec.num_query_groups, spec.head_dim
    out = {QKV + "weight": T.interleave_qkv(*(get(f"{prefix}{p}_proj.weight") for p in "qkv"), g, dh)}
    if spec.qkv_bias:
        out[QKV + "bias"] = T.interleave_qkv(*(get(f"{prefix}{p}_proj.bias") for p in "qkv"), g, dh)
    out[PROJ + "weight"] = get(f"{prefix}o_proj.weight")
    if spec.add_bias_linear:
        out[PROJ + "bias"] = get(f"{prefix}o_proj.bias")
    if spec.qk_layernorm:
        for p in "qk":
            out[f"self_attention.{p}_layernorm.weight"] = get(f"{prefix}{p}_norm.weight")
    return out


def attention_to_hf(get: Getter, spec: ModelSpec, interleaved_out: bool, prefix: str = "self_attn.") -> Tensors:
    """Our dense attention tensors -> Hugging Face ``q/k/v/o_proj`` (+ biases, q/k norms), with
    the query/key rows permuted into the target's RoPE layout."""
    h, g, dh = spec.num_attention_heads, spec.num_query_groups, spec.head_dim
    perm = rope_perm(spec, interleaved_out)
    out: Tensors = {}
    names = ["weight"] + (["bias"] if spec.qkv_bias else [])
    for name in names:
        q, k, v = T.split_qkv(get(QKV + name), h, g, dh)
        out[f"{prefix}q_proj.{name}"] = _perm(q, perm)
        out[f"{prefix}k_proj.{name}"] = _perm(k, perm)
        out[f"{prefix}v_proj.{name}"] = v
    out[f"{prefix}o_proj.weight"] = get(PROJ + "weight")
    if spec.add_bias_linear:
        out[f"{prefix}o_proj.bias"] = get(PROJ + "bias")
    if spec.qk_layernorm:
        for p in "qk":
            for name in ["weight"] + (["bias"] if spec.normalization == "LayerNorm" else []):
                out[f"{prefix}{p}_norm.{name}"] = _perm(get(f"self_attention.{p}_layernorm.{name}"), perm)
    return out


def mlp_from_hf(get: Getter, spec: ModelSpec, prefix: str = "mlp.") -> Tensors:
    """Hugging Face SwiGLU ``gate/up/down_proj`` (+ biases) -> our ``linear_fc1/fc2``."""
    out = {"mlp.linear_fc1.weight": T.join_gate_up(get(prefix + "gate_proj.weight"), get(prefix + "up_proj.weight")),
           "mlp.linear_fc2.weight": get(prefix + "down_proj.weight")}
    if spec.add_bias_linear:
        out["mlp.linear_fc1.bias"] = T.join_gate_up(get(prefix + "gate_proj.bias"), get(prefix + "up_proj.bias"))
        out["mlp.linear_fc2.bias"] = get(prefix + "down_proj.bias")
    return out


def mlp_to_hf(get: Getter, spec: ModelSpec, source: str = "mlp.", prefix: str = "mlp.", names=("gate_proj", "up_proj", "down_proj")) -> Tensors:
    """Our SwiGLU ``linear_fc1/fc2`` (under ``source``) -> Hugging Face gate/up/down (``names``)."""
    gate, up = T.split_gate_up(get(source + "linear_fc1.weight"))
    out = {f"{prefix}{names[0]}.weight": gate, f"{prefix}{names[1]}.weight": up,
           f"{prefix}{names[2]}.weight": get(source + "linear_fc2.weight")}
    if spec.add_bias_linear:
        gate_b, up_b = T.split_gate_up(get(source + "linear_fc1.bias"))
        out.update({f"{prefix}{names[0]}.bias": gate_b, f"{prefix}{names[1]}.bias": up_b,
                    f"{prefix}{names[2]}.bias": get(source + "linear_fc2.bias")})
    return out


# ------------------------------------------------------------------------------ config.json


def common_spec_fields(cfg: HFConfig, seq_length: Optional[int], vocab_multiple: int) -> dict:
    """``ModelSpec`` fields every supported class reads the same way; refuses (naming the field)
    a non-SwiGLU activation, any RoPE scaling, a partial or non-integer RoPE, GQA that does not
    divide."""
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise cfg.refuse("hidden_act", "only SwiGLU (silu) FFNs are supported")
    rope = cfg.rope()
    if rope["rope_type"] not in ("default", None):
        raise cfg.refuse(rope["field"], "RoPE scaling is not supported (this project implements plain RoPE only)")
    theta = rope["rope_theta"]
    if theta is None:
        raise HFError(f"{cfg.path} gives no rope_theta; add it to config.json (the model's RoPE base)")
    if float(theta) != int(theta):
        raise cfg.refuse("rope_theta", "a non-integer RoPE base is not supported (--rotary-base is an integer)")
    partial = rope["partial_rotary_factor"]
    if partial not in (None, 1, 1.0):
        raise cfg.refuse("partial_rotary_factor", "partial RoPE is not supported for this architecture")
    hidden, heads = int(cfg.require("hidden_size")), int(cfg.require("num_attention_heads"))
    groups = int(cfg.get("num_key_value_heads", heads))
    if groups <= 0 or heads % groups:
        raise cfg.refuse("num_key_value_heads", f"must divide num_attention_heads {heads}")
    vocab = int(cfg.require("vocab_size"))
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    seq = int(seq_length or min(max_pos, 4096))
    return dict(
        num_layers=int(cfg.require("num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg.require("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=-(-vocab // vocab_multiple) * vocab_multiple,  # Megatron-LM's padding, TP 1
        max_position_embeddings=max(max_pos, seq),
        seq_length=seq,
        rotary_base=int(theta),
        swiglu=True,
        untied=True,  # tied models are imported untied (a copy: exact)
    )


def check_sliding_window(cfg: HFConfig, seq_length: int, always_on: bool) -> None:
    """Refuse a sliding window shorter than the training sequence (full attention is exact
    only up to the window)."""
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types") or []
    active = always_on or bool(cfg.get("use_sliding_window")) or "sliding_attention" in layer_types
    if active and window is not None and int(window) < seq_length:
        raise cfg.refuse(
            "sliding_window",
            f"sliding-window attention shorter than the sequence ({seq_length}) is not supported; "
            f"import with --seq-length {int(window)} or less",
        )


def export_common_config(spec: ModelSpec) -> dict:
    """The ``config.json`` fields shared by the native classes."""
    return {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_query_groups,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": not spec.untied,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def native_problem(spec: ModelSpec) -> Optional[str]:
    """What no native class here represents: learned positions, partial RoPE, non-SwiGLU FFNs."""
    if spec.position_embedding_type != "rope":
        return "learned absolute position embeddings"
    if spec.rotary_percent != 1.0:
        return f"partial RoPE (--rotary-percent {spec.rotary_percent})"
    if not spec.swiglu:
        return "a non-gated (GELU) FFN"
    return None
