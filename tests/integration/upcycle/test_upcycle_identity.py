"""N identical copies of a dense seed, upcycled, compute exactly what the seed computes.

Goes through the real checkpoint path: the dense model is saved in torch_dist format, read back as
global tensors, mapped by ``bam_megatron.upcycle.mapping``, written as a checkpoint and loaded into the
BAM model.
"""

import pytest
import torch
from megatron.core.dist_checkpointing import load_plain_tensors
from support.models import SEQ, VOCAB, batch, moe_overrides, tiny_config

from bam_megatron.checkpoint.weights import load_model_weights, save_global_tensors, save_model_weights
from bam_megatron.model.build import build_bam_model
from bam_megatron.model.config import BAMConfig
from bam_megatron.upcycle.mapping import AttentionShape, upcycle_state

N = 3

CASES = {
    # name: (mode, BAMConfig kwargs, FFN (topk, pre_softmax), seed query groups, parallel block)
    "kv-experts/soft/ffn-k=N": ("full", {}, (N, True), 4, True),
    "shared-kv/soft/ffn-k=N": ("shared-kv", {"kv_sharing": True}, (N, True), 4, True),
    "kv-experts/gqa/ffn-top2-renorm": ("full", {}, (2, False), 2, True),
    "shared-kv/gqa/ffn-top2-renorm": ("shared-kv", {"kv_sharing": True}, (2, False), 2, True),
    "kv-experts/attn-top2-renorm": ("full", {"attn_routing": "topk", "attn_topk": 2}, (N, True), 4, True),
    "btx-merged/ffn-top2-renorm": ("merged", {}, (2, False), 2, True),
    "sequential/kv-experts": ("full", {}, (N, True), 2, False),
    "sequential/shared-kv": ("shared-kv", {"kv_sharing": True}, (2, False), 4, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_identical_seeds_give_the_dense_logits(single_process, tmp_path, name):
    mode, bam_kwargs, (topk, pre_softmax), groups, parallel = CASES[name]
    dense_cfg = tiny_config(num_query_groups=groups)
    dense = build_bam_model(
        dense_cfg, BAMConfig(parallel_block=parallel), vocab_size=VOCAB, max_sequence_length=SEQ
    )
    tokens, position_ids, _ = batch()
    dense.eval()
    with torch.no_grad():
        expected = dense(tokens, position_ids, None)
    save_model_weights(dense, str(tmp_path / "seed"))

    seed = load_plain_tensors(str(tmp_path / "seed"))
    shape = AttentionShape(dense_cfg.num_attention_heads, groups, dense_cfg.kv_channels)
    # Random (non-zero) routers: with identical experts any routing must give the same result.
    tensors = upcycle_state([seed] * N, mode=mode, shape=shape, router_init="random", router_std=0.5)
    save_global_tensors(tensors, str(tmp_path / "bam"))

    attn_experts = 1 if mode == "merged" else N
    bam_cfg = tiny_config(num_query_groups=groups, **moe_overrides(N, topk, pre_softmax))
    bam = BAMConfig(attn_experts=attn_experts, parallel_block=parallel, **bam_kwargs)
    model = build_bam_model(bam_cfg, bam, vocab_size=VOCAB, max_sequence_length=SEQ)
    load_model_weights(model, str(tmp_path / "bam"))
    model.eval()
    with torch.no_grad():
        got = model(tokens, position_ids, None)
    assert got.shape == (tokens.shape[0], SEQ, VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_distinct_seeds_do_not_collapse_to_one(single_process, tmp_path):
    """Guard against a mapping that ignores all but one seed: with distinct seeds the upcycled
    model differs from every seed."""
    cfg = tiny_config()
    seeds = []
    for i in range(2):
        torch.manual_seed(100 + i)
        m = build_bam_model(cfg, BAMConfig(), vocab_size=VOCAB, max_sequence_length=SEQ)
        save_model_weights(m, str(tmp_path / f"seed{i}"))
        seeds.append(load_plain_tensors(str(tmp_path / f"seed{i}")))
    shape = AttentionShape(cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels)
    tensors = upcycle_state(seeds, mode="full", shape=shape)
    qkv = tensors["decoder.layers.self_attention.linear_qkv.weight"]
    assert torch.equal(qkv[:, 0], seeds[0]["decoder.layers.self_attention.linear_qkv.weight"])
    assert torch.equal(qkv[:, 1], seeds[1]["decoder.layers.self_attention.linear_qkv.weight"])
    emb = tensors["embedding.word_embeddings.weight"]
    torch.testing.assert_close(
        emb, (seeds[0]["embedding.word_embeddings.weight"] + seeds[1]["embedding.word_embeddings.weight"]) / 2
    )
