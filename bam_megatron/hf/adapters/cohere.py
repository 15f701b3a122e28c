"""``CohereForCausalLM`` (Command-R / Aya Expanse): the parallel block, BAM's own block.

``x + Attn(LN(x)) + SwiGLU(LN(x))`` with one mean-centred LayerNorm without bias per block
(this project's LayerNorm with a zero bias: exact), interleaved RoPE (``--rotary-interleaved``),
logits multiplied by ``logit_scale`` and, by default, tied embeddings.

Import: ``logit_scale`` is folded into the (untied) output layer, ``output_layer = logit_scale ·
lm_head`` (the embedding when tied); the norm biases are zeros. Export (of a dense parallel
LayerNorm model whose norm biases are all zero): ``logit_scale = 1``; a halves-layout RoPE model
has its query/key rows permuted into the interleaved layout (exact). ``use_qk_norm`` (per-head
norm weights) and ``attention_bias`` (biases on q, k, v and o but not the MLP) are refused.
"""

from __future__ import annotations

from typing import Optional

import torch

from bam_megatron.hf import tensors as T
from bam_megatron.hf.adapters import common as C
from bam_megatron.hf.adapters.base import Adapter, Getter, HFConfig, Tensors, rope_config
from bam_megatron.hf.spec import ModelSpec


class CohereAdapter(Adapter):
    architecture = "CohereForCausalLM"
    model_type = "cohere"
    tied_default = True

    def spec_from_config(self, cfg: HFConfig, seq_length: Optional[int], vocab_multiple: int) -> ModelSpec:
        fields = C.common_spec_fields(cfg, seq_length, vocab_multiple)
        if cfg.get("use_qk_norm", False):
            raise cfg.refuse("use_qk_norm", "Cohere's per-head query/key norms are not supported")
        if cfg.get("attention_bias", False):
            raise cfg.refuse("attention_bias", "biases on the attention but not the MLP are not supported")
        return ModelSpec(**fields, normalization="LayerNorm", norm_epsilon=float(cfg.get("layer_norm_eps", 1e-5)),
                         parallel_block=True, rotary_interleaved=True)

    def import_globals(self, get: Getter, spec: ModelSpec, cfg: HFConfig) -> Tensors:
        emb = get("model.embed_tokens.weight")
        head = emb if self.tied(cfg) else get("lm_head.weight")
        scale = float(cfg.get("logit_scale", 1.0))
        norm = get("model.norm.weight")
        return {"embedding.word_embeddings.weight": T.pad_rows(emb, spec.vocab_size),
                "decoder.final_layernorm.weight": norm,
                "decoder.final_layernorm.bias": torch.zeros_like(norm),
                "output_layer.weight": T.pad_rows((head.float() * scale).to(head.dtype), spec.vocab_size)}

    def import_layer(self, get: Getter, spec: ModelSpec) -> Tensors:
        norm = get("input_layernorm.weight")
        out = {"input_layernorm.weight": norm, "input_layernorm.bias": torch.zeros_like(norm)}
        out.update(C.attention_from_hf(get, spec))
        out.update(C.mlp_from_hf(get, spec))
        return out

    def export_problem(self, spec: ModelSpec) -> Optional[str]:
        problem = C.native_problem(spec)
        if problem:
            return problem
        if not spec.parallel_block:
            return "sequential blocks"
        if spec.normalization != "LayerNorm":
            return "RMSNorm"
        if spec.is_moa or spec.is_moe:
            return "experts"
        if spec.qkv_bias:
            return "linear-layer biases"
        if spec.qk_layernorm:
            return "query/key norms"
        return None

    def value_problem(self, read_global: Getter, read_layers: Getter, spec: ModelSpec) -> Optional[str]:
        """Cohere's LayerNorm has no bias: exact only when every norm bias is zero."""
        if read_global("decoder.final_layernorm.bias").any():
            return "a non-zero final LayerNorm bias"
        if read_layers("input_layernorm.bias").any():
            return "non-zero LayerNorm biases"
        return None

    def export_config(self, spec: ModelSpec) -> dict:
        return {"architectures": [self.architecture], "model_type": self.model_type, **C.export_common_config(spec),
                "layer_norm_eps": spec.norm_epsilon, "logit_scale": 1.0, "use_qk_norm": False,
                "attention_bias": False, **rope_config(spec)}

    def export_globals(self, get: Getter, spec: ModelSpec) -> Tensors:
        get("decoder.final_layernorm.bias")  # zero (checked by value_problem)
        out = {"model.embed_tokens.weight": get("embedding.word_embeddings.weight"),
               "model.norm.weight": get("decoder.final_layernorm.weight")}
        if spec.untied:
            out["lm_head.weight"] = get("output_layer.weight")
        return out

    def export_layer(self, get: Getter, spec: ModelSpec) -> Tensors:
        get("input_layernorm.bias")  # zero (checked by value_problem)
        out = {"input_layernorm.weight": get("input_layernorm.weight")}
        out.update(C.attention_to_hf(get, spec, interleaved_out=True))
        out.update(C.mlp_to_hf(get, spec))
        return out
