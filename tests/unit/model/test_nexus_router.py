"""The Nexus router and the shared FFN expert against a reference written here: the projection
``e_i = W2·SwiGLU(W1·d_i)``, logits ``x·e_i``, top-1 routing over the domain experts and the
always-on shared expert — outputs and gradients; aux losses reach the projection. (The router's
tensors through a checkpoint: ``tests/integration/model/test_nexus_router_checkpoint.py``.)"""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker
from support.models import SEQ, VOCAB, batch, moe_overrides, tiny_config

from bam_megatron.model.build import build_bam_model
from bam_megatron.model.config import BAMConfig, BAMConfigError, validate_bam_setup
from bam_megatron.model.nexus_router import NexusConfig, NexusRouter

N, D, P, F_SHARED = 3, 32, 48, 80
NEXUS = BAMConfig(attn_experts=1, ffn_router="nexus", nexus_domain_size=D, nexus_projection_size=P)
NEXUS_SIZES = NexusConfig(domain_size=D, projection_size=P)


def _config(**extra):
    moe = moe_overrides(N, 1, True, moe_shared_expert_intermediate_size=F_SHARED, **extra)
    return tiny_config(**moe)


def _swiglu(x, fc1, fc2):
    gate, up = (x @ fc1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.t()


def _reference(x, w):
    """The Nexus MoE layer written out: ``x [T, d]``, ``w`` the layer's weights (leaves)."""
    gate, up = (w["domain"] @ w["fc1"].t()).chunk(2, dim=-1)
    e = (F.silu(gate) * up) @ w["fc2"].t()  # [N, d] expert embeddings
    probs = torch.softmax(x @ e.t(), dim=-1)  # [T, N]
    top = probs.argmax(dim=-1)
    out = _swiglu(x, w["shared_fc1"], w["shared_fc2"])  # always on
    for i in range(N):
        chosen = (top == i).unsqueeze(-1)
        out = out + torch.where(chosen, probs[:, i : i + 1] * _swiglu(x, w[f"fc1_{i}"], w[f"fc2_{i}"]), 0.0)
    return out, top


def _layer_weights(mlp):
    r = mlp.router
    named = {"domain": r.domain_embeddings, "fc1": r.projection_fc1.weight, "fc2": r.projection_fc2.weight,
             "shared_fc1": mlp.shared_experts.linear_fc1.weight, "shared_fc2": mlp.shared_experts.linear_fc2.weight}
    for i, expert in enumerate(mlp.experts.local_experts):
        named[f"fc1_{i}"], named[f"fc2_{i}"] = expert.linear_fc1.weight, expert.linear_fc2.weight
    return named


def test_projection_shared_expert_and_top1_match_the_reference(single_process):
    model = build_bam_model(_config(), NEXUS, vocab_size=VOCAB, max_sequence_length=SEQ)
    mlp = model.decoder.layers[0].mlp
    assert isinstance(mlp.router, NexusRouter) and type(mlp).__name__ == "MoELayer"
    assert not hasattr(mlp.router, "weight") and mlp.router.domain_embeddings.requires_grad is False
    with torch.no_grad():  # distinct domains, projection large enough to route decisively
        mlp.router.domain_embeddings.normal_(0, 1, generator=torch.Generator().manual_seed(3))
        mlp.router.projection_fc1.weight.mul_(8)
        mlp.router.projection_fc2.weight.mul_(8)
    weights = _layer_weights(mlp)
    ref_w = {k: v.detach().clone().requires_grad_(k != "domain") for k, v in weights.items()}

    g = torch.Generator().manual_seed(5)
    x = torch.randn(SEQ, 2, 64, generator=g)
    x_model, x_ref = x.clone().requires_grad_(), x.reshape(-1, 64).clone().requires_grad_()
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    mlp.train()
    out, bias = mlp(x_model)
    ref, top = _reference(x_ref, ref_w)
    assert bias is None and len(set(top.tolist())) == N  # every domain expert gets tokens
    torch.testing.assert_close(out.reshape(-1, 64), ref, atol=1e-5, rtol=1e-5)

    upstream = torch.randn(out.shape, generator=g)
    out.backward(upstream)
    ref.backward(upstream.reshape(-1, 64))
    torch.testing.assert_close(x_model.grad.reshape(-1, 64), x_ref.grad, atol=1e-5, rtol=1e-5)
    for name, w in weights.items():
        if name == "domain":
            assert w.grad is None  # fixed, not trained
            continue
        assert w.grad is not None and w.grad.abs().sum() > 0, name
        torch.testing.assert_close(w.grad, ref_w[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_aux_and_z_loss_reach_the_projection(single_process):
    def grads(cfg, state=None):
        model = build_bam_model(cfg, NEXUS, vocab_size=VOCAB, max_sequence_length=SEQ)
        if state is not None:
            model.load_state_dict(state)
        tokens, position_ids, labels = batch(2, seed=1)
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
        clear_aux_losses_tracker()
        model(tokens, position_ids, None, labels=labels).mean().backward()
        return model, model.decoder.layers[0].mlp.router.projection_fc1.weight.grad.clone()

    model, off = grads(_config(moe_aux_loss_coeff=0.0))
    _, on = grads(_config(moe_aux_loss_coeff=0.5, moe_z_loss_coeff=0.1), model.state_dict())
    assert off.abs().sum() > 0 and not torch.allclose(on, off)


def test_nexus_settings_errors_are_one_line():
    with pytest.raises(BAMConfigError, match="need FFN experts; set --num-experts"):
        validate_bam_setup(tiny_config(), BAMConfig(ffn_router="nexus"))
    shared = tiny_config(**moe_overrides(2, 1, True, moe_shared_expert_intermediate_size=90))
    shared.sequence_parallel = True
    with pytest.raises(BAMConfigError, match="--moe-shared-expert-intermediate-size 90 is not divisible"):
        validate_bam_setup(shared, BAMConfig(), tensor_model_parallel_size=4)
    with pytest.raises(BAMConfigError, match="--moe-router-type"):
        BAMConfig(ffn_router="learned")


def test_domain_embeddings_stay_fp32_in_a_bf16_model(single_process):
    cfg = tiny_config(**moe_overrides(N, 1, True), params_dtype=torch.bfloat16)
    router = NexusRouter(cfg, nexus=NEXUS_SIZES)
    assert router.domain_embeddings.dtype == torch.float32 and router.projection_fc1.weight.dtype == torch.bfloat16
    x = torch.randn(SEQ, 2, 64, dtype=torch.bfloat16)
    assert router.gating(x).shape == (SEQ, 2, N)
