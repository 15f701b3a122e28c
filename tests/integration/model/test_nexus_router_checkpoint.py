"""The Nexus router's tensors (domain embeddings, projection) and the shared FFN expert round-trip
through a torch_dist checkpoint with their global shapes; the parameter count is the model's."""

import torch
from support.models import SEQ, VOCAB, moe_overrides, tiny_config

from bam_megatron.checkpoint.weights import load_model_weights, read_global_tensors, save_model_weights
from bam_megatron.model.build import build_bam_model
from bam_megatron.model.config import BAMConfig
from bam_megatron.model.flops import ModelShape, parameter_counts

N, D, P, F_SHARED = 3, 32, 48, 80
NEXUS = BAMConfig(attn_experts=1, ffn_router="nexus", nexus_domain_size=D, nexus_projection_size=P)


def _config(**extra):
    moe = moe_overrides(N, 1, True, moe_shared_expert_intermediate_size=F_SHARED, **extra)
    return tiny_config(**moe)


def test_router_tensors_round_trip_through_a_checkpoint(single_process, tmp_path):
    cfg = _config()
    model = build_bam_model(cfg, NEXUS, vocab_size=VOCAB, max_sequence_length=SEQ)
    with torch.no_grad():
        model.decoder.layers[1].mlp.router.domain_embeddings.fill_(0.25)
    save_model_weights(model, str(tmp_path / "ckpt"))
    saved = read_global_tensors(str(tmp_path / "ckpt"))
    lp = "decoder.layers.mlp."
    assert saved[lp + "router.domain_embeddings"].shape == (2, N, D)
    assert saved[lp + "router.projection_fc1.weight"].shape == (2, 2 * P, D)
    assert saved[lp + "router.projection_fc2.weight"].shape == (2, 64, P)
    assert saved[lp + "shared_experts.linear_fc1.weight"].shape == (2, 2 * F_SHARED, 64)
    assert lp + "router.weight" not in saved
    total, active = parameter_counts(ModelShape(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4, head_dim=16, ffn_hidden_size=96,
        vocab_size=VOCAB, ffn_experts=N, ffn_topk=1, shared_ffn_size=F_SHARED, nexus_sizes=(D, P)))
    assert total == sum(p.numel() for p in model.parameters())
    assert total - active == 2 * (N - 1) * 3 * 64 * 96  # all but one routed expert per layer idle
    assert torch.equal(saved[lp + "router.domain_embeddings"][1], torch.full((N, D), 0.25))

    torch.manual_seed(99)  # another init
    other = build_bam_model(cfg, NEXUS, vocab_size=VOCAB, max_sequence_length=SEQ)
    load_model_weights(other, str(tmp_path / "ckpt"))
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name
