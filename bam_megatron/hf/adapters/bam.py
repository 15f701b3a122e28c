"""``BAMForCausalLM`` (``bam_megatron/hf/bam_model``): every model of this project, exactly.

The export target for what no native class holds: parallel blocks with RMSNorm or biased
LayerNorm, attention experts (KV experts or shared KV; soft or top-k routing), BAM-style
pre-softmax top-k FFN experts, learned positions, partial or interleaved RoPE, GELU FFNs.

| ours (one layer, relative to ``decoder.layers.``) | ``BAMForCausalLM`` (relative to ``model.layers.<i>.``) |
|---|---|
| ``input_layernorm``, ``pre_mlp_layernorm`` | ``input_layernorm``, ``post_attention_layernorm`` (sequential) |
| dense attention (as Llama) | ``self_attn.{q,k,v,o}_proj`` (+ biases, ``{q,k}_norm``) |
| ``self_attention.router.weight [N, d]`` | ``self_attn.router.weight`` |
| KV experts ``linear_qkv [N, G(r+2)dh, d]``, ``linear_proj [N, d, Hdh]`` | ``self_attn.experts.<e>.{q,k,v,o}_proj.weight`` |
| shared KV ``linear_q [N, Hdh, d]``, ``linear_kv [2Gdh, d]`` | ``self_attn.experts.<e>.q_proj``, ``self_attn.{k,v}_proj`` |
| dense FFN ``linear_fc1``, ``linear_fc2`` | ``mlp.{gate,up,down}_proj`` (GELU: ``mlp.{up,down}_proj``) |
| ``mlp.router.weight [N, d]``; experts ``[N, ...]`` | ``mlp.router.weight``; ``mlp.experts.<e>.{gate,up,down}_proj`` |

Globals: ``model.embed_tokens``, ``model.embed_positions`` (learned positions), ``model.norm``
(+ bias), ``lm_head`` (always stored; a tied model's embedding is copied).
"""

from __future__ import annotations

from typing import Optional

from bam_megatron.hf import tensors as T
from bam_megatron.hf.adapters import common as C
from bam_megatron.hf.adapters.base import Adapter, Getter, Tensors
from bam_megatron.hf.spec import ModelSpec

AUTO_MAP = {"AutoConfig": "configuration_bam.BAMConfig", "AutoModelForCausalLM": "modeling_bam.BAMForCausalLM"}


class BAMAdapter(Adapter):
    architecture = "BAMForCausalLM"
    model_type = "bam"

    def export_problem(self, spec: ModelSpec) -> Optional[str]:
        return None

    def export_config(self, spec: ModelSpec) -> dict:
        return {
            "architectures": [self.architecture], "model_type": self.model_type, "auto_map": dict(AUTO_MAP),
            "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
            "intermediate_size": spec.ffn_hidden_size, "moe_intermediate_size": spec.expert_ffn,
            "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.num_query_groups, "head_dim": spec.head_dim,
            "max_position_embeddings": spec.max_position_embeddings,
            "hidden_act": "silu" if spec.swiglu else "gelu", "gated_mlp": spec.swiglu,
            "norm_type": spec.normalization.lower(), "norm_eps": spec.norm_epsilon,
            "parallel_block": spec.parallel_block, "position_embedding_type": spec.position_embedding_type,
            "rope_theta": float(spec.rotary_base), "partial_rotary_factor": spec.rotary_percent,
            "rope_interleaved": spec.rotary_interleaved,
            "qkv_bias": spec.qkv_bias, "linear_bias": spec.add_bias_linear, "qk_norm": spec.qk_layernorm,
            "num_attention_experts": spec.attn_experts, "kv_sharing": spec.kv_sharing,
            "attention_routing": spec.attn_routing, "attention_top_k": spec.attn_topk,
            "attention_top_k_renormalize": spec.attn_topk_renormalize,
            "num_experts": spec.num_experts or 0, "num_experts_per_tok": spec.moe_router_topk,
            "router_pre_softmax": spec.moe_router_pre_softmax,
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
        norms = [("input_layernorm", "input_layernorm")]
        if not spec.parallel_block:
            norms.append(("pre_mlp_layernorm", "post_attention_layernorm"))
        out: Tensors = {}
        for ours, theirs in norms:
            out[f"{theirs}.weight"] = get(f"{ours}.weight")
            if spec.normalization == "LayerNorm":
                out[f"{theirs}.bias"] = get(f"{ours}.bias")
        out.update(self._attention(get, spec) if spec.is_moa else
                   C.attention_to_hf(get, spec, interleaved_out=spec.rotary_interleaved))
        out.update(self._moe(get, spec) if spec.is_moe else self._mlp(get, spec, "mlp.", "mlp."))
        return out

    def _attention(self, get: Getter, spec: ModelSpec) -> Tensors:
        h, g, dh = spec.num_attention_heads, spec.num_query_groups, spec.head_dim
        out = {"self_attn.router.weight": get("self_attention.router.weight")}
        proj = get("self_attention.linear_proj.weight")
        if spec.kv_sharing:
            q_all = get("self_attention.linear_q.weight")
            out["self_attn.k_proj.weight"], out["self_attn.v_proj.weight"] = T.split_kv(get("self_attention.linear_kv.weight"), g, dh)
        else:
            qkv_all = get("self_attention.linear_qkv.weight")
        for e in range(spec.attn_experts):
            pre = f"self_attn.experts.{e}."
            if spec.kv_sharing:
                out[pre + "q_proj.weight"] = q_all[e]
            else:
                q, k, v = T.split_qkv(qkv_all[e], h, g, dh)
                out.update({pre + "q_proj.weight": q, pre + "k_proj.weight": k, pre + "v_proj.weight": v})
            out[pre + "o_proj.weight"] = proj[e]
        return out

    def _mlp(self, get: Getter, spec: ModelSpec, source: str, prefix: str) -> Tensors:
        if spec.swiglu:
            return C.mlp_to_hf(get, spec, source=source, prefix=prefix)
        out = {prefix + "up_proj.weight": get(source + "linear_fc1.weight"),
               prefix + "down_proj.weight": get(source + "linear_fc2.weight")}
        if spec.add_bias_linear:
            out[prefix + "up_proj.bias"] = get(source + "linear_fc1.bias")
            out[prefix + "down_proj.bias"] = get(source + "linear_fc2.bias")
        return out

    def _moe(self, get: Getter, spec: ModelSpec) -> Tensors:
        out = {"mlp.router.weight": get("mlp.router.weight")}
        for e in range(spec.num_experts):
            expert = lambda name, e=e: get(name)[e]
            out.update(self._mlp(expert, spec, "mlp.experts.experts.", f"mlp.experts.{e}."))
        return out
