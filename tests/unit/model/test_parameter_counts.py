"""model/flops.py's parameter count equals the parameters megatron-core builds (one process)."""

import pytest
from support.models import VOCAB, moe_overrides, tiny_config

from bam_megatron.model.build import build_bam_model
from bam_megatron.model.config import BAMConfig
from bam_megatron.model.flops import ModelShape, parameter_counts

CASES = {
    "dense": (dict(), BAMConfig()),
    "btx": (moe_overrides(4, 2, False), BAMConfig()),
    "bam kv experts": (moe_overrides(4, 1, True), BAMConfig(attn_experts=4)),
    "bam shared kv, gqa": (dict(num_query_groups=2, **moe_overrides(4, 1, True)), BAMConfig(attn_experts=4, kv_sharing=True)),
    "sequential, top-2 attention": (moe_overrides(2, 1, True), BAMConfig(attn_experts=2, attn_routing="topk", attn_topk=1, parallel_block=False)),
    "sequential, q/k/v bias, q/k norm (Qwen)": (dict(add_qkv_bias=True, qk_layernorm=True, num_query_groups=2), BAMConfig(parallel_block=False)),
    "parallel LayerNorm, q/k norm": (dict(normalization="LayerNorm", qk_layernorm=True), BAMConfig()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_counts_match_the_built_model(case, single_process):
    overrides, bam = CASES[case]
    cfg = tiny_config(**overrides)
    model = build_bam_model(cfg, bam, vocab_size=VOCAB, max_sequence_length=16)
    built = sum(p.numel() for p in model.parameters())
    shape = ModelShape(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, head_dim=cfg.kv_channels, ffn_hidden_size=cfg.ffn_hidden_size,
        vocab_size=VOCAB, attn_experts=bam.attn_experts, kv_sharing=bam.kv_sharing,
        attn_topk=bam.attn_topk if bam.attn_routing == "topk" else None,
        ffn_experts=cfg.num_moe_experts or 0, ffn_topk=cfg.moe_router_topk if cfg.num_moe_experts else 1,
        untied_output=True, sequential_block=not bam.parallel_block,  # build_bam_model unties by default
        qkv_bias=cfg.add_qkv_bias, qk_layernorm=cfg.qk_layernorm, layernorm=cfg.normalization == "LayerNorm",
    )
    total, active = parameter_counts(shape)
    assert total == built
    assert active <= total
