"""``BAMForCausalLM`` on its own: the KV cache (one per expert with KV experts, one shared with
shared KV), greedy generation with the cache equals recomputation, padding, router outputs."""

import pytest
import torch

from bam_megatron.hf.bam_model.configuration_bam import BAMConfig
from bam_megatron.hf.bam_model.modeling_bam import BAMForCausalLM

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, num_attention_experts=3, num_experts=3,
            num_experts_per_tok=2, router_pre_softmax=False)
VARIANTS = {
    "kv-experts": dict(kv_sharing=False),
    "shared-kv": dict(kv_sharing=True),
    "shared-kv/topk-attention/sequential/layernorm": dict(kv_sharing=True, attention_routing="topk", attention_top_k=2,
                                                          parallel_block=False, norm_type="layernorm"),
    "kv-experts/interleaved-partial-rope/pre-softmax": dict(rope_interleaved=True, partial_rotary_factor=0.5,
                                                           router_pre_softmax=True, num_experts_per_tok=1),
    "dense/learned-positions/gelu/biases": dict(num_attention_experts=1, num_experts=0, position_embedding_type="learned_absolute",
                                                gated_mlp=False, hidden_act="gelu", linear_bias=True, qk_norm=True),
}


def _model(variant: str) -> BAMForCausalLM:
    torch.manual_seed(0)
    model = BAMForCausalLM(BAMConfig(**{**BASE, **VARIANTS[variant]})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 3.0) + (1.0 if p.dim() == 1 else 0.0))
    return model


def _greedy(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_with_the_cache_equals_recomputation(variant):
    model = _model(variant)
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy(model, ids, 8))


@pytest.mark.parametrize("variant,heads", [("kv-experts", 3 * 2), ("shared-kv", 2)])
def test_cache_holds_one_set_per_expert_or_one_shared(variant, heads):
    model = _model(variant)
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert cache.layers[0].keys.shape == (1, heads, 7, 8)


@pytest.mark.parametrize("variant", ["kv-experts", "shared-kv/topk-attention/sequential/layernorm"])
def test_chunked_prefill_and_left_padding_give_the_full_pass(variant):
    model = _model(variant)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :4], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        rest = model(ids[:, 4:], cache=cache, use_cache=True).logits
        torch.testing.assert_close(torch.cat([first.logits, rest], 1), full)
        padded = torch.cat([torch.zeros(2, 3, dtype=ids.dtype), ids], 1)
        mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], 1)
        torch.testing.assert_close(model(padded, attention_mask=mask, use_cache=False).logits[:, 3:], full)


def test_router_logits_and_load_balancing_loss():
    model = _model("kv-experts")
    ids = torch.randint(0, 96, (2, 6))
    out = model(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (12, 3)
    assert len(out.attention_router_logits) == 2 and out.attention_router_logits[0].shape == (12, 3)
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0 and torch.isfinite(out.loss)
    plain = model(ids)
    assert plain.router_logits is None and plain.aux_loss is None


def test_config_declares_the_cache_heads_and_reads_configs_written_before():
    """``num_key_value_heads`` is what the cache holds per layer (transformers sizes caches from
    it): N·G with KV experts, G with shared KV; ``expert_key_value_heads`` is G. A config.json
    without ``expert_key_value_heads`` (older exports) meant G by ``num_key_value_heads``."""
    kv = BAMConfig(**BASE)
    shared = BAMConfig(**{**BASE, "kv_sharing": True})
    assert (kv.expert_key_value_heads, kv.num_key_value_heads) == (2, 6)
    assert (shared.expert_key_value_heads, shared.num_key_value_heads) == (2, 2)
    again = BAMConfig(**kv.to_dict())  # a saved config.json holds both
    assert (again.expert_key_value_heads, again.num_key_value_heads) == (2, 6)
    assert BAMForCausalLM(again).model.layers[0].self_attn.num_key_value_groups == 2


def test_tied_embeddings_share_the_weight():
    model = BAMForCausalLM(BAMConfig(**{**BASE, "tie_word_embeddings": True}))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = BAMForCausalLM(BAMConfig(**BASE))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_nexus_router_logits_are_tokens_times_projected_domain_embeddings():
    cfg = BAMConfig(**{**BASE, "router_type": "nexus", "nexus_domain_size": 8, "nexus_projection_size": 12,
                       "shared_expert_intermediate_size": 20, "num_experts_per_tok": 1, "router_pre_softmax": True})
    model = BAMForCausalLM(cfg).eval()
    router = model.model.layers[0].mlp.router
    assert router.domain_embeddings.dtype == torch.float32 and "model.layers.0.mlp.router.domain_embeddings" in model.state_dict()
    x = torch.randn(5, 32)
    gate, up = (router.domain_embeddings @ router.projection_fc1.weight.t()).chunk(2, dim=-1)
    expected = x @ ((torch.nn.functional.silu(gate) * up) @ router.projection_fc2.weight.t()).t()
    torch.testing.assert_close(router(x), expected)
    with pytest.raises(ValueError, match="need FFN experts"):
        BAMConfig(**{**BASE, "num_experts": 0, "router_type": "nexus"})
