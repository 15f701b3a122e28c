"""The models of the Hugging Face tests: transformers configurations to import (one per supported
architecture and the variants that change the mapping) and models of this project to export (one
per kind of model the export must handle, built with redrawn weights and saved with their
recorded arguments)."""

import torch
import transformers

from support.hf import model_args, redraw, save_ours
from support.models import moe_overrides, tiny_config

V, S = 256, 32

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

NEXUS = dict(ffn_router="nexus", nexus_domain_size=32, nexus_projection_size=48)
GELU = dict(gated_linear_unit=False, activation_func=torch.nn.functional.gelu, add_bias_linear=True)

# name: (TransformerConfig overrides, BAMConfig kwargs, position embedding, class written)
EXPORT_CASES = {
    "dense-sequential": ({"num_query_groups": 2}, {"parallel_block": False}, "rope", "LlamaForCausalLM"),
    "dense-sequential-interleaved-rope": ({"rotary_interleaved": True}, {"parallel_block": False}, "rope", "LlamaForCausalLM"),
    "dense-sequential-qkv-bias": ({"add_qkv_bias": True}, {"parallel_block": False}, "rope", "Qwen2ForCausalLM"),
    "dense-sequential-qk-norm": ({"qk_layernorm": True, "num_query_groups": 1}, {"parallel_block": False}, "rope", "Qwen3ForCausalLM"),
    "dense-parallel": ({}, {}, "rope", "BAMForCausalLM"),
    "dense-parallel-layernorm": ({"normalization": "LayerNorm"}, {}, "rope", "BAMForCausalLM"),
    "dense-parallel-layernorm-zero-bias": ({"normalization": "LayerNorm"}, {}, "rope", "CohereForCausalLM"),
    "dense-gelu-learned-positions": (GELU, {}, "learned_absolute", "BAMForCausalLM"),
    "btx-sequential": (moe_overrides(4, 2, False), {"parallel_block": False}, "rope", "MixtralForCausalLM"),
    "btx-parallel": (moe_overrides(4, 2, False), {}, "rope", "BAMForCausalLM"),
    "bam-kv-experts": (moe_overrides(4, 1, True), {"attn_experts": 4}, "rope", "BAMForCausalLM"),
    "bam-shared-kv": (dict(num_query_groups=2, **moe_overrides(4, 2, True)), {"attn_experts": 4, "kv_sharing": True},
                      "rope", "BAMForCausalLM"),
    "bam-topk-attention-sequential": (moe_overrides(4, 2, False), {"attn_experts": 4, "attn_routing": "topk", "attn_topk": 2,
                                                                   "parallel_block": False}, "rope", "BAMForCausalLM"),
    # Nexus: the seed's FFN as the shared expert, top-1 over the domain experts; BAM adds one
    # attention expert per domain expert plus the seed's (README: Nexus).
    "nexus-btx": (moe_overrides(4, 1, True, moe_shared_expert_intermediate_size=80), {"parallel_block": False, **NEXUS},
                  "rope", "BAMForCausalLM"),
    "nexus-bam": (moe_overrides(3, 1, True, moe_shared_expert_intermediate_size=80), {"attn_experts": 4, **NEXUS},
                  "rope", "BAMForCausalLM"),
}


def case_configs(case: str, tp: int = 1, ep: int = 1, pp: int = 1):
    """``(TransformerConfig, BAMConfig, position embedding)`` of ``case`` at a parallel layout."""
    from bam_megatron.model.config import BAMConfig

    overrides, bam_kwargs, position, _ = EXPORT_CASES[case]
    layout = dict(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, sequence_parallel=tp > 1,
                  pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
    return tiny_config(**overrides, **layout), BAMConfig(**bam_kwargs), position


def build(case: str, tp: int = 1, ep: int = 1, pp: int = 1):
    """This rank's model of ``case`` at the layout (its pipeline stage) and its recorded arguments."""
    from bam_megatron.model.build import build_bam_model

    cfg, bam, position = case_configs(case, tp, ep, pp)
    model = build_bam_model(cfg, bam, vocab_size=V, max_sequence_length=S, position_embedding_type=position, parallel_output=False)
    return model, model_args(cfg, bam, V, S, position=position)


def build_and_save(case: str, root: str, seed: int = 1, tokenizer: bool = False):
    """Our model of ``case`` with redrawn weights, saved with its recorded arguments (and with
    ``tokenizer`` a word-level ``tokenizer.json`` of V tokens in ``<root>/tokenizer/``, recorded
    by its absolute path)."""
    torch.manual_seed(seed)
    model, args = build(case)
    if tokenizer:
        import os

        from support.hf import write_tokenizer

        folder = os.path.join(os.path.abspath(root), "tokenizer")
        os.makedirs(folder)
        write_tokenizer(folder, V)
        args.update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=os.path.join(folder, "tokenizer.json"))
    redraw(model, seed)
    if case.endswith("zero-bias"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layernorm" in name and name.endswith("bias"):
                    p.zero_()
    model.eval()
    save_ours(model, root, args)
    return model


def load_export(folder: str):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
