"""``BAMForCausalLM`` (``bam_megatron/hf/bam_model``): every model of this project, exactly, both ways.

The export target for what no native class holds: parallel blocks with RMSNorm or biased
LayerNorm, attention experts (KV experts or shared KV; soft or top-k routing), BAM-style
pre-softmax top-k FFN experts, the Nexus router and the shared FFN expert, learned positions,
partial or interleaved RoPE, GELU FFNs. The import reads such a folder back (e.g. after a PEFT
LoRA fine-tune, merged) into the checkpoint of the same model, so training can go on.

| ours (one layer, relative to ``decoder.layers.``) | ``BAMForCausalLM`` (relative to ``model.layers.<i>.``) |
|---|---|
| ``input_layernorm``, ``pre_mlp_layernorm`` | ``input_layernorm``, ``post_attention_layernorm`` (sequential) |
| dense attention (as Llama) | ``self_attn.{q,k,v,o}_proj`` (+ biases, ``{q,k}_norm``) |
| ``self_attention.router.weight [N, d]`` | ``self_attn.router.weight`` |
| KV experts ``linear_qkv [N, G(r+2)dh, d]``, ``linear_proj [N, d, Hdh]`` | ``self_attn.experts.<e>.{q,k,v,o}_proj.weight`` |
| shared KV ``linear_q [N, Hdh, d]``, ``linear_kv [2Gdh, d]`` | ``self_attn.experts.<e>.q_proj``, ``self_attn.{k,v}_proj`` |
| dense FFN ``linear_fc1``, ``linear_fc2`` | ``mlp.{gate,up,down}_proj`` (GELU: ``mlp.{up,down}_proj``) |
| ``mlp.router.weight [N, d]``; experts ``[N, ...]`` | ``mlp.router.weight``; ``mlp.experts.<e>.{gate,up,down}_proj`` |
| Nexus ``mlp.router.domain_embeddings [N, D]`` (fp32), ``projection_fc1 [2P, D]``, ``projection_fc2 [d, P]`` | the same names under ``mlp.router.`` |
| ``mlp.shared_experts.linear_fc1/fc2`` | ``mlp.shared_expert.{gate,up,down}_proj`` |

Globals: ``model.embed_tokens``, ``model.embed_positions`` (learned positions), ``model.norm``
(+ bias), ``lm_head`` (always stored; a tied model's embedding is copied).
"""

from __future__ import annotations

from typing import Optional

import torch

from bam_megatron.errors import HFError
from bam_megatron.hf import tensors as T
from bam_megatron.hf.adapters import common as C
from bam_megatron.hf.adapters.base import Adapter, Getter, HFConfig, Tensors
from bam_megatron.hf.spec import ModelSpec

AUTO_MAP = {"AutoConfig": "configuration_bam.BAMConfig", "AutoModel": "modeling_bam.BAMModel",
            "AutoModelForCausalLM": "modeling_bam.BAMForCausalLM"}
ATTN = "self_attention."
EXPERTS = "mlp.experts.experts."
SHARED = "mlp.shared_experts."
NEXUS = ("domain_embeddings", "projection_fc1.weight", "projection_fc2.weight")


class BAMAdapter(Adapter):
    architecture = "BAMForCausalLM"
    model_type = "bam"

    # ---------------------------------------------------------------- export (ours -> HF)
    def export_problem(self, spec: ModelSpec) -> Optional[str]:
        return None

    def export_config(self, spec: ModelSpec) -> dict:
        g = spec.num_query_groups
        return {
            "architectures": [self.architecture], "model_type": self.model_type, "auto_map": dict(AUTO_MAP),
            "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
            "intermediate_size": spec.ffn_hidden_size, "moe_intermediate_size": spec.expert_ffn,
            "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_attention_heads,
            "expert_key_value_heads": g, "num_key_value_heads": g * (1 if spec.kv_sharing else spec.attn_experts),
            "head_dim": spec.head_dim, "max_position_embeddings": spec.max_position_embeddings,
            "hidden_act": "silu" if spec.swiglu else "gelu", "gated_mlp": spec.swiglu,
            "norm_type": spec.normalization.lower(), "norm_eps": spec.norm_epsilon,
            "parallel_block": spec.parallel_block, "position_embedding_type": spec.position_embedding_type,
            "rope_theta": float(spec.rotary_base), "partial_rotary_factor": spec.rotary_percent,
            "rope_interleaved": spec.rotary_interleaved,
            "qkv_bias": spec.qkv_bias, "linear_bias": spec.add_bias_linear, "qk_norm": spec.qk_layernorm,
            "attention_dropout": 0.0,
            "num_attention_experts": spec.attn_experts, "kv_sharing": spec.kv_sharing,
            "attention_routing": spec.attn_routing, "attention_top_k": spec.attn_topk,
            "attention_top_k_renormalize": spec.attn_topk_renormalize,
            "num_experts": spec.num_experts or 0, "num_experts_per_tok": spec.moe_router_topk,
            "router_pre_softmax": spec.moe_router_pre_softmax, "router_type": spec.moe_router_type,
            "nexus_domain_size": spec.nexus_domain_size, "nexus_projection_size": spec.nexus_projection_size,
            "shared_expert_intermediate_size": spec.shared_expert_ffn,
            "output_router_logits": False, "router_aux_loss_coef": 0.0,
            "tie_word_embeddings": False, "use_cache": True,
        }

    def export_globals(self, get: Getter, spec: ModelSpec) -> Tensors:
        emb = get("embedding.word_embeddings.weight")
        out = {"model.embed_tokens.weight": emb, "model.norm.weight": get("decoder.final_layernorm.weight"),
               "lm_head.weight": get("output_layer.weight") if spec.untied else emb}
        if spec.normalization == "LayerNorm":
            out["model.norm.bias"] = get("decoder.final_layernorm.bias")
        if spec.position_embedding_type == "learned_absolute":
            out["model.embed_positions.weight"] = get("embedding.position_embeddings.weight")
        return out

    def export_layer(self, get: Getter, spec: ModelSpec) -> Tensors:
        out: Tensors = {}
        for ours, theirs in _norm_names(spec):
            out[f"{theirs}.weight"] = get(f"{ours}.weight")
            if spec.normalization == "LayerNorm":
                out[f"{theirs}.bias"] = get(f"{ours}.bias")
        out.update(self._attention(get, spec) if spec.is_moa else
                   C.attention_to_hf(get, spec, interleaved_out=spec.rotary_interleaved))
        out.update(self._moe(get, spec) if spec.is_moe else _mlp_to(get, spec, "mlp.", "mlp.", spec.add_bias_linear))
        return out

    def _attention(self, get: Getter, spec: ModelSpec) -> Tensors:
        h, g, dh = spec.num_attention_heads, spec.num_query_groups, spec.head_dim
        out = {"self_attn.router.weight": get(ATTN + "router.weight")}
        proj = get(ATTN + "linear_proj.weight")
        if spec.kv_sharing:
            q_all = get(ATTN + "linear_q.weight")
            out["self_attn.k_proj.weight"], out["self_attn.v_proj.weight"] = T.split_kv(get(ATTN + "linear_kv.weight"), g, dh)
        else:
            qkv_all = get(ATTN + "linear_qkv.weight")
        for e in range(spec.attn_experts):
            pre = f"self_attn.experts.{e}."
            if spec.kv_sharing:
                out[pre + "q_proj.weight"] = q_all[e]
            else:
                q, k, v = T.split_qkv(qkv_all[e], h, g, dh)
                out.update({pre + "q_proj.weight": q, pre + "k_proj.weight": k, pre + "v_proj.weight": v})
            out[pre + "o_proj.weight"] = proj[e]
        return out

    def _moe(self, get: Getter, spec: ModelSpec) -> Tensors:
        if spec.is_nexus:
            out = {f"mlp.router.{name}": get(f"mlp.router.{name}") for name in NEXUS}
        else:
            out = {"mlp.router.weight": get("mlp.router.weight")}
        for e in range(spec.num_experts):
            expert = lambda name, e=e: get(name)[e]
            out.update(_mlp_to(expert, spec, EXPERTS, f"mlp.experts.{e}.", spec.add_bias_linear))
        if spec.shared_expert_ffn:
            out.update(_mlp_to(get, spec, SHARED, "mlp.shared_expert.", False))
        return out

    # ---------------------------------------------------------------- import (HF -> ours)
    def spec_from_config(self, cfg: HFConfig, seq_length: Optional[int], vocab_multiple: int) -> ModelSpec:
        return spec_from_bam_config(cfg, seq_length, vocab_multiple)

    def import_globals(self, get: Getter, spec: ModelSpec, cfg: HFConfig) -> Tensors:
        emb = get("model.embed_tokens.weight")
        head = emb if self.tied(cfg) else get("lm_head.weight")
        out = {"embedding.word_embeddings.weight": T.pad_rows(emb, spec.vocab_size),
               "decoder.final_layernorm.weight": get("model.norm.weight"),
               "output_layer.weight": T.pad_rows(head, spec.vocab_size)}
        if spec.normalization == "LayerNorm":
            out["decoder.final_layernorm.bias"] = get("model.norm.bias")
        if spec.position_embedding_type == "learned_absolute":
            out["embedding.position_embeddings.weight"] = get("model.embed_positions.weight")
        return out

    def import_layer(self, get: Getter, spec: ModelSpec) -> Tensors:
        out: Tensors = {}
        for ours, theirs in _norm_names(spec):
            out[f"{ours}.weight"] = get(f"{theirs}.weight")
            if spec.normalization == "LayerNorm":
                out[f"{ours}.bias"] = get(f"{theirs}.bias")
        out.update(self._attention_from(get, spec) if spec.is_moa else _dense_attention_from(get, spec))
        out.update(self._moe_from(get, spec) if spec.is_moe else _mlp_from(get, spec, "mlp.", "mlp.", spec.add_bias_linear))
        return out

    def _attention_from(self, get: Getter, spec: ModelSpec) -> Tensors:
        g, dh = spec.num_query_groups, spec.head_dim
        experts = [f"self_attn.experts.{e}." for e in range(spec.attn_experts)]
        out = {ATTN + "router.weight": get("self_attn.router.weight"),
               ATTN + "linear_proj.weight": torch.stack([get(p + "o_proj.weight") for p in experts])}
        if spec.kv_sharing:
            out[ATTN + "linear_q.weight"] = torch.stack([get(p + "q_proj.weight") for p in experts])
            out[ATTN + "linear_kv.weight"] = T.join_kv(get("self_attn.k_proj.weight"), get("self_attn.v_proj.weight"), g, dh)
        else:
            out[ATTN + "linear_qkv.weight"] = torch.stack(
                [T.interleave_qkv(*(get(f"{p}{n}_proj.weight") for n in "qkv"), g, dh) for p in experts])
        return out

    def _moe_from(self, get: Getter, spec: ModelSpec) -> Tensors:
        if spec.is_nexus:
            out = {f"mlp.router.{name}": get(f"mlp.router.{name}") for name in NEXUS}
        else:
            out = {"mlp.router.weight": get("mlp.router.weight")}
        per_expert = [_mlp_from(lambda n, e=e: get(f"mlp.experts.{e}.{n}"), spec, "", EXPERTS, spec.add_bias_linear)
                      for e in range(spec.num_experts)]
        out.update({key: torch.stack([p[key] for p in per_expert]) for key in per_expert[0]})
        if spec.shared_expert_ffn:
            out.update(_mlp_from(get, spec, "mlp.shared_expert.", SHARED, False))
        return out


def _norm_names(spec: ModelSpec):
    """(ours, theirs) per-layer norms."""
    return [("input_layernorm", "input_layernorm")] + ([] if spec.parallel_block else [("pre_mlp_layernorm", "post_attention_layernorm")])


def _mlp_to(get: Getter, spec: ModelSpec, source: str, prefix: str, bias: bool) -> Tensors:
    """Our ``linear_fc1/fc2`` (under ``source``) -> ``gate/up/down_proj`` (GELU: ``up/down_proj``)."""
    if spec.swiglu:
        return C.mlp_to_hf(get, spec.with_(add_bias_linear=bias), source=source, prefix=prefix)
    out = {prefix + "up_proj.weight": get(source + "linear_fc1.weight"), prefix + "down_proj.weight": get(source + "linear_fc2.weight")}
    if bias:
        out[prefix + "up_proj.bias"] = get(source + "linear_fc1.bias")
        out[prefix + "down_proj.bias"] = get(source + "linear_fc2.bias")
    return out


def _mlp_from(get: Getter, spec: ModelSpec, prefix: str, dest: str, bias: bool) -> Tensors:
    """``gate/up/down_proj`` (GELU: ``up/down_proj``) under ``prefix`` -> our ``linear_fc1/fc2`` under ``dest``."""
    names = ["weight"] + (["bias"] if bias else [])
    out: Tensors = {}
    for name in names:
        up = get(f"{prefix}up_proj.{name}")
        out[f"{dest}linear_fc1.{name}"] = T.join_gate_up(get(f"{prefix}gate_proj.{name}"), up) if spec.swiglu else up
        out[f"{dest}linear_fc2.{name}"] = get(f"{prefix}down_proj.{name}")
    return out


def _dense_attention_from(get: Getter, spec: ModelSpec) -> Tensors:
    """Dense attention as Llama's, plus LayerNorm query/key norm biases."""
    out = C.attention_from_hf(get, spec)
    if spec.qk_layernorm and spec.normalization == "LayerNorm":
        for p in "qk":
            out[f"{ATTN}{p}_layernorm.bias"] = get(f"self_attn.{p}_norm.bias")
    return out


def spec_from_bam_config(cfg: HFConfig, seq_length: Optional[int], vocab_multiple: int) -> ModelSpec:
    """The ``ModelSpec`` of a ``BAMForCausalLM`` ``config.json`` (see ``configuration_bam.py``);
    refuses, naming the field, what the checkpoint cannot hold."""
    rope = cfg.rope()
    if rope["rope_type"] not in ("default", None):
        raise cfg.refuse(rope["field"], "RoPE scaling is not supported (this project implements plain RoPE only)")
    theta = float(rope["rope_theta"] if rope["rope_theta"] is not None else 10000.0)
    if theta != int(theta):
        raise cfg.refuse("rope_theta", "a non-integer RoPE base is not supported (--rotary-base is an integer)")
    gated = bool(cfg.get("gated_mlp", True))
    if cfg.get("hidden_act", "silu") != ("silu" if gated else "gelu"):
        raise cfg.refuse("hidden_act", "BAM models have SwiGLU (silu, gated_mlp) or GELU (not gated) FFNs")
    heads = int(cfg.require("num_attention_heads"))
    hidden = int(cfg.require("hidden_size"))
    groups = int(cfg.get("expert_key_value_heads") or cfg.get("num_key_value_heads") or heads)
    if heads % groups:
        raise cfg.refuse("expert_key_value_heads", f"must divide num_attention_heads {heads}")
    experts = int(cfg.get("num_experts", 0)) or None
    router = cfg.get("router_type", "linear")
    if router not in ("linear", "nexus"):
        raise cfg.refuse("router_type", "must be linear or nexus")
    vocab, max_pos = int(cfg.require("vocab_size")), int(cfg.get("max_position_embeddings", 2048))
    seq = int(seq_length or min(max_pos, 4096))
    ffn = int(cfg.require("intermediate_size"))
    n_attn = int(cfg.get("num_attention_experts", 1))
    norm = cfg.get("norm_type", "rmsnorm")
    if norm not in ("rmsnorm", "layernorm"):
        raise cfg.refuse("norm_type", "must be rmsnorm or layernorm")
    linear_bias = bool(cfg.get("linear_bias", False))
    if cfg.get("position_embedding_type", "rope") not in ("rope", "learned_absolute"):
        raise cfg.refuse("position_embedding_type", "must be rope or learned_absolute")
    if cfg.get("position_embedding_type") == "learned_absolute" and seq > max_pos:
        raise HFError(f"{cfg.path}: the model learned {max_pos} positions; import with --seq-length {max_pos} or less")
    try:
        return ModelSpec(
            num_layers=int(cfg.require("num_hidden_layers")), hidden_size=hidden, ffn_hidden_size=ffn,
            num_attention_heads=heads, num_query_groups=groups, head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=-(-vocab // vocab_multiple) * vocab_multiple, max_position_embeddings=max(max_pos, seq),
            seq_length=seq, normalization="RMSNorm" if norm == "rmsnorm" else "LayerNorm",
            norm_epsilon=float(cfg.get("norm_eps", 1e-5)), position_embedding_type=cfg.get("position_embedding_type", "rope"),
            rotary_base=int(theta), rotary_percent=float(rope["partial_rotary_factor"] or 1.0),
            rotary_interleaved=bool(cfg.get("rope_interleaved", False)), swiglu=gated, add_bias_linear=linear_bias,
            add_qkv_bias=bool(cfg.get("qkv_bias", False)) and not linear_bias, qk_layernorm=bool(cfg.get("qk_norm", False)),
            untied=True, parallel_block=bool(cfg.get("parallel_block", True)), attn_experts=n_attn,
            kv_sharing=bool(cfg.get("kv_sharing", False)) and n_attn > 1,
            attn_routing=cfg.get("attention_routing", "soft") if n_attn > 1 else "soft",
            attn_topk=int(cfg.get("attention_top_k", 1)), attn_topk_renormalize=bool(cfg.get("attention_top_k_renormalize", True)),
            num_experts=experts, moe_ffn_hidden_size=int(cfg.get("moe_intermediate_size") or ffn) if experts else None,
            moe_router_topk=int(cfg.get("num_experts_per_tok", 1)) if experts else 1,
            moe_router_pre_softmax=bool(cfg.get("router_pre_softmax", True)) if experts else True,
            moe_router_type=router if experts else "linear",
            nexus_domain_size=int(cfg.get("nexus_domain_size") or hidden) if router == "nexus" and experts else None,
            nexus_projection_size=int(cfg.get("nexus_projection_size") or hidden) if router == "nexus" and experts else None,
            shared_expert_ffn=int(cfg.get("shared_expert_intermediate_size", 0)) if experts else 0,
        )
    except (TypeError, ValueError) as exc:
        raise HFError(f"{cfg.path}: a field has a value of the wrong type ({exc})") from None
