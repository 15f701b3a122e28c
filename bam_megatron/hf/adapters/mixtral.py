"""``MixtralForCausalLM`` for BTX-style models (export only).

Exact for sequential RMSNorm blocks with dense attention and N SwiGLU FFN experts whose top-k
weights are renormalised: Mixtral's softmax over all experts -> top-k -> divide by their sum
equals megatron-core's top-k logits -> softmax over the k (``--no-moe-router-pre-softmax``), and
with k = N also the softmax over all (``--moe-router-pre-softmax``). BAM's pre-softmax top-k with
k < N does not renormalise and goes to ``BAMForCausalLM``.

Per layer (Hugging Face's stored names, which transformers 4 and 5 both read):
``mlp.router.weight [N, d]`` -> ``block_sparse_moe.gate.weight``; expert ``e``'s
``linear_fc1 [2F, d]`` -> ``block_sparse_moe.experts.<e>.w1`` (gate) and ``.w3`` (up),
``linear_fc2`` -> ``.w2``; attention and norms as Llama.
"""

from __future__ import annotations

from typing import Optional

from bam_megatron.hf.adapters import common as C
from bam_megatron.hf.adapters.base import Getter, Tensors
from bam_megatron.hf.adapters.llama import LlamaAdapter
from bam_megatron.hf.spec import ModelSpec

EXPERTS = "mlp.experts.experts."


class MixtralAdapter(LlamaAdapter):
    architecture = "MixtralForCausalLM"
    model_type = "mixtral"

    def export_problem(self, spec: ModelSpec) -> Optional[str]:
        if not spec.is_moe:
            return "no FFN experts"
        if spec.moe_router_pre_softmax and spec.moe_router_topk != spec.num_experts:
            return "top-k FFN routing without renormalisation (--moe-router-pre-softmax)"
        if spec.add_bias_linear:
            return "linear-layer biases"
        if spec.is_nexus:
            return "a Nexus router"
        if spec.shared_expert_ffn:
            return "a shared FFN expert"
        return super().export_problem(spec.with_(num_experts=None))

    def export_config(self, spec: ModelSpec) -> dict:
        cfg = super().export_config(spec)
        for key in ("attention_bias", "mlp_bias"):
            cfg.pop(key)
        cfg.update(intermediate_size=spec.expert_ffn, num_local_experts=spec.num_experts,
                   num_experts_per_tok=spec.moe_router_topk, sliding_window=None, output_router_logits=False,
                   router_aux_loss_coef=0.0, router_jitter_noise=0.0)
        return cfg

    def export_layer(self, get: Getter, spec: ModelSpec) -> Tensors:
        out = {"input_layernorm.weight": get("input_layernorm.weight"),
               "post_attention_layernorm.weight": get("pre_mlp_layernorm.weight"),
               "block_sparse_moe.gate.weight": get("mlp.router.weight")}
        out.update(C.attention_to_hf(get, spec, interleaved_out=False))
        for e in range(spec.num_experts):
            expert = lambda name, e=e: get(name)[e]
            out.update(C.mlp_to_hf(expert, spec, source=EXPERTS, prefix=f"block_sparse_moe.experts.{e}.",
                                   names=("w1", "w3", "w2")))
        return out
