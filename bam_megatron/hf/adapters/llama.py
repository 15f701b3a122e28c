"""Sequential-block dense models: Llama, Mistral, Qwen2 (QKV bias) and Qwen3 (QK norm).

All four share the block ``x + Attn(RMSNorm(x))`` then ``+ SwiGLU(RMSNorm(.))`` with
halves-layout RoPE; they differ in biases, query/key norms and sliding windows:

| class | biases | q/k norm | sliding window |
|---|---|---|---|
| ``LlamaForCausalLM`` | ``attention_bias`` + ``mlp_bias`` (both or neither) | no | no |
| ``MistralForCausalLM`` | no | no | ``sliding_window`` (must cover the sequence) |
| ``Qwen2ForCausalLM`` | q, k, v (``--add-qkv-bias``) | no | if ``use_sliding_window`` |
| ``Qwen3ForCausalLM`` | no (``attention_bias`` refused) | ``q_norm``/``k_norm`` (``--qk-layernorm``) | if ``use_sliding_window`` |

Global tensors: ``model.embed_tokens.weight`` <-> ``embedding.word_embeddings.weight``,
``model.norm.weight`` <-> ``decoder.final_layernorm.weight``, ``lm_head.weight`` <->
``output_layer.weight`` (a tied model's embedding is copied: exact). Per layer:
``input_layernorm`` <-> ``input_layernorm``, ``post_attention_layernorm`` <->
``pre_mlp_layernorm``, attention and MLP as in ``common.py``.
"""

from __future__ import annotations

from typing import Optional

from bam_megatron.hf import tensors as T
from bam_megatron.hf.adapters import common as C
from bam_megatron.hf.adapters.base import Adapter, Getter, HFConfig, Tensors, rope_config
from bam_megatron.hf.spec import ModelSpec


class LlamaAdapter(Adapter):
    architecture = "LlamaForCausalLM"
    model_type = "llama"
    sliding_always_on = False

    # ---------------------------------------------------------------- import
    def bias_fields(self, cfg: HFConfig) -> dict:
        attn, mlp = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
        if attn != mlp:
            field = "attention_bias" if attn else "mlp_bias"
            raise cfg.refuse(field, "biases on only the attention or only the MLP are not supported (both or neither)")
        return {"add_bias_linear": attn}

    def qk_norm(self, cfg: HFConfig) -> bool:
        return False

    def spec_from_config(self, cfg: HFConfig, seq_length: Optional[int], vocab_multiple: int) -> ModelSpec:
        fields = C.common_spec_fields(cfg, seq_length, vocab_multiple)
        C.check_sliding_window(cfg, fields["seq_length"], self.sliding_always_on)
        return ModelSpec(**fields, normalization="RMSNorm", norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
                         parallel_block=False, qk_layernorm=self.qk_norm(cfg), **self.bias_fields(cfg))

    def import_globals(self, get: Getter, spec: ModelSpec, cfg: HFConfig) -> Tensors:
        emb = get("model.embed_tokens.weight")
        head = emb if self.tied(cfg) else get("lm_head.weight")
        return {"embedding.word_embeddings.weight": T.pad_rows(emb, spec.vocab_size),
                "decoder.final_layernorm.weight": get("model.norm.weight"),
                "output_layer.weight": T.pad_rows(head, spec.vocab_size)}

    def import_layer(self, get: Getter, spec: ModelSpec) -> Tensors:
        out = {"input_layernorm.weight": get("input_layernorm.weight"),
               "pre_mlp_layernorm.weight": get("post_attention_layernorm.weight")}
        out.update(C.attention_from_hf(get, spec))
        out.update(C.mlp_from_hf(get, spec))
        return out

    # ---------------------------------------------------------------- export
    def export_problem(self, spec: ModelSpec) -> Optional[str]:
        problem = C.native_problem(spec)
        if problem:
            return problem
        if spec.parallel_block:
            return "parallel blocks"
        if spec.normalization != "RMSNorm":
            return "LayerNorm"
        if spec.is_moa or spec.is_moe:
            return "experts"
        if spec.add_qkv_bias:
            return "biases on the query/key/value projection only"
        if spec.qk_layernorm:
            return "query/key norms"
        return None

    def export_config(self, spec: ModelSpec) -> dict:
        return {"architectures": [self.architecture], "model_type": self.model_type, **C.export_common_config(spec),
                "rms_norm_eps": spec.norm_epsilon, "attention_bias": spec.add_bias_linear,
                "mlp_bias": spec.add_bias_linear, **rope_config(spec)}

    def export_globals(self, get: Getter, spec: ModelSpec) -> Tensors:
        out = {"model.embed_tokens.weight": get("embedding.word_embeddings.weight"),
               "model.norm.weight": get("decoder.final_layernorm.weight")}
        if spec.untied:
            out["lm_head.weight"] = get("output_layer.weight")
        return out

    def export_layer(self, get: Getter, spec: ModelSpec) -> Tensors:
        out = {"input_layernorm.weight": get("input_layernorm.weight"),
               "post_attention_layernorm.weight": get("pre_mlp_layernorm.weight")}
        out.update(C.attention_to_hf(get, spec, interleaved_out=False))
        out.update(C.mlp_to_hf(get, spec))
        return out


class MistralAdapter(LlamaAdapter):
    architecture = "MistralForCausalLM"
    model_type = "mistral"
    sliding_always_on = True

    def bias_fields(self, cfg: HFConfig) -> dict:
        return {"add_bias_linear": False}


class Qwen2Adapter(LlamaAdapter):
    architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"

    def bias_fields(self, cfg: HFConfig) -> dict:
        return {"add_bias_linear": False, "add_qkv_bias": True}

    def export_problem(self, spec: ModelSpec) -> Optional[str]:
        if not spec.add_qkv_bias:
            return "no query/key/value biases"
        return super().export_problem(spec.with_(add_qkv_bias=False))

    def export_config(self, spec: ModelSpec) -> dict:
        cfg = super().export_config(spec)
        for key in ("attention_bias", "mlp_bias"):
            cfg.pop(key)
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.num_layers,
                   layer_types=["full_attention"] * spec.num_layers)
        return cfg


class Qwen3Adapter(LlamaAdapter):
    architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"

    def bias_fields(self, cfg: HFConfig) -> dict:
        if cfg.get("attention_bias", False):
            raise cfg.refuse("attention_bias", "Qwen3's attention biases (q, k, v and o, no MLP bias) are not supported")
        return {"add_bias_linear": False}

    def qk_norm(self, cfg: HFConfig) -> bool:
        return True

    def export_problem(self, spec: ModelSpec) -> Optional[str]:
        if not spec.qk_layernorm:
            return "no query/key norms"
        if spec.add_bias_linear:
            return "biases"
        return super().export_problem(spec.with_(qk_layernorm=False))

    def export_config(self, spec: ModelSpec) -> dict:
        cfg = super().export_config(spec)
        cfg.pop("mlp_bias")
        cfg.update(attention_bias=False, use_sliding_window=False, sliding_window=None,
                   max_window_layers=spec.num_layers, layer_types=["full_attention"] * spec.num_layers)
        return cfg
