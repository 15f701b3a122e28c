"""Which Hugging Face class each model is exported as, decided from the checkpoint's tensor
shapes and recorded arguments alone (no tensor data)."""

import pytest

from bam_megatron.errors import HFError
from bam_megatron.hf.adapters import EXPORTERS, IMPORTERS
from bam_megatron.hf.spec import LP, ModelSpec, checkpoint_shapes, spec_from_checkpoint
from bam_megatron.training.arguments import MODEL_ARGS

BASE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, head_dim=16,
            vocab_size=256, max_position_embeddings=64, seq_length=64)
MOE = dict(num_experts=4, moe_ffn_hidden_size=96)
NEXUS = dict(moe_router_type="nexus", nexus_domain_size=32, nexus_projection_size=48)
CHOICES = {
    # name: (ModelSpec fields, class)
    "dense sequential": ({}, "LlamaForCausalLM"),
    "dense sequential, all biases": ({"add_bias_linear": True}, "LlamaForCausalLM"),
    "dense sequential, interleaved RoPE": ({"rotary_interleaved": True}, "LlamaForCausalLM"),
    "dense sequential, QKV bias": ({"add_qkv_bias": True}, "Qwen2ForCausalLM"),
    "dense sequential, QK norm": ({"qk_layernorm": True}, "Qwen3ForCausalLM"),
    "dense sequential, QK norm and QKV bias": ({"qk_layernorm": True, "add_qkv_bias": True}, "BAMForCausalLM"),
    "dense sequential, LayerNorm": ({"normalization": "LayerNorm"}, "BAMForCausalLM"),
    "dense parallel, LayerNorm": ({"parallel_block": True, "normalization": "LayerNorm"}, "CohereForCausalLM"),
    "dense parallel, RMSNorm": ({"parallel_block": True}, "BAMForCausalLM"),
    "dense, learned positions": ({"position_embedding_type": "learned_absolute"}, "BAMForCausalLM"),
    "dense, partial RoPE": ({"rotary_percent": 0.5}, "BAMForCausalLM"),
    "dense, GELU": ({"swiglu": False}, "BAMForCausalLM"),
    "BTX sequential, top-2 renormalised": ({**MOE, "moe_router_topk": 2, "moe_router_pre_softmax": False}, "MixtralForCausalLM"),
    "BTX sequential, top-N pre-softmax": ({**MOE, "moe_router_topk": 4, "moe_router_pre_softmax": True}, "MixtralForCausalLM"),
    "BTX sequential, top-1 pre-softmax": ({**MOE, "moe_router_topk": 1, "moe_router_pre_softmax": True}, "BAMForCausalLM"),
    "BTX parallel": ({**MOE, "parallel_block": True, "moe_router_topk": 2, "moe_router_pre_softmax": False}, "BAMForCausalLM"),
    "BAM KV experts": ({**MOE, "parallel_block": True, "attn_experts": 4}, "BAMForCausalLM"),
    "BAM shared KV, sequential": ({**MOE, "attn_experts": 4, "kv_sharing": True, "moe_router_pre_softmax": False,
                                   "moe_router_topk": 2}, "BAMForCausalLM"),
    "Nexus BTX sequential, top-2 renormalised": ({**MOE, **NEXUS, "moe_router_topk": 2, "moe_router_pre_softmax": False},
                                                 "BAMForCausalLM"),
    "BTX sequential with a shared expert": ({**MOE, "shared_expert_ffn": 96, "moe_router_topk": 2,
                                             "moe_router_pre_softmax": False}, "BAMForCausalLM"),
}


def _choose(spec):
    for cls in EXPORTERS:
        if cls().export_problem(spec) is None:
            return cls.architecture


@pytest.mark.parametrize("name", list(CHOICES))
def test_export_class(name):
    fields, expected = CHOICES[name]
    assert _choose(ModelSpec(**{**BASE, **fields})) == expected


def test_recorded_arguments_are_the_model_arguments_and_read_back():
    spec = ModelSpec(**BASE, qk_layernorm=True, rotary_interleaved=True, rotary_base=500000)
    args = spec.to_args()
    assert set(MODEL_ARGS) <= set(args)
    assert spec_from_checkpoint(args, checkpoint_shapes(spec), "ckpt") == spec


def test_shapes_win_and_contradictions_are_one_line():
    spec = ModelSpec(**BASE)
    shapes = checkpoint_shapes(spec)
    args = {**spec.to_args(), "num_query_groups": 4}  # the tensors say 2
    assert spec_from_checkpoint(args, shapes, "ckpt").num_query_groups == 2
    with pytest.raises(HFError, match="does not fit 5 heads"):
        spec_from_checkpoint({**args, "num_attention_heads": 5}, shapes, "ckpt")
    del shapes[LP + "mlp.linear_fc2.weight"]
    with pytest.raises(HFError, match="no FFN weights"):
        spec_from_checkpoint(args, shapes, "ckpt")


def test_importable_architectures():
    assert set(IMPORTERS) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "CohereForCausalLM",
                              "BAMForCausalLM"}


@pytest.mark.parametrize("fields", [
    {**MOE, **NEXUS, "shared_expert_ffn": 80, "moe_router_topk": 1},
    {**MOE, **NEXUS, "attn_experts": 4, "parallel_block": True, "shared_expert_ffn": 80, "moe_router_topk": 1},
    {**MOE, "attn_experts": 4, "kv_sharing": True, "position_embedding_type": "learned_absolute", "normalization": "LayerNorm"},
])
def test_nexus_router_shared_expert_and_experts_read_back_from_the_shapes(fields):
    """The Nexus sizes and the shared expert come from the stored shapes (as the experts do);
    the recorded arguments name them as ``pretrain_bam.py`` does."""
    spec = ModelSpec(**{**BASE, **fields})
    shapes = checkpoint_shapes(spec)
    args = spec.to_args()
    assert spec_from_checkpoint(args, shapes, "ckpt") == spec
    if spec.is_nexus:
        assert shapes[LP + "mlp.router.domain_embeddings"] == (2, 4, 32) and LP + "mlp.router.weight" not in shapes
        assert args["moe_router_type"] == "nexus" and args["moe_shared_expert_intermediate_size"] == 80
    assert _choose(spec) == "BAMForCausalLM"
