"""Router gradients, aux losses through megatron-core's tracker, activation recompute, and the
one-line configuration errors."""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from support.models import SEQ, VOCAB, batch, moe_overrides, tiny_config

from bam_megatron.model.build import build_bam_model
from bam_megatron.model.config import BAMConfig, BAMConfigError, validate_bam_setup


def _grads(cfg, bam, state=None):
    """Loss and gradients of one forward/backward; ``state`` pins the weights."""
    model = build_bam_model(cfg, bam, vocab_size=VOCAB, max_sequence_length=SEQ)
    if state is not None:
        model.load_state_dict(state)
    tokens, position_ids, labels = batch(2, seed=11)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))  # the shape the schedules use
    clear_aux_losses_tracker()
    loss = model(tokens, position_ids, None, labels=labels).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, loss.item(), grads


def test_aux_losses_are_tracked_and_reach_the_router(single_process):
    bam = BAMConfig(attn_experts=2)
    base = moe_overrides(2, 1, True, moe_router_load_balancing_type="aux_loss")
    cfg_off = tiny_config(**base, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    model, _, grads_off = _grads(cfg_off, bam)
    state = model.state_dict()

    cfg_on = tiny_config(**base, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    _, loss_on, grads_on = _grads(cfg_on, bam, state)
    tracker = get_moe_layer_wise_logging_tracker()
    assert {"load_balancing_loss", "z_loss"} <= set(tracker)
    for name in ("load_balancing_loss", "z_loss"):
        values = tracker[name]["values"]
        assert values.shape[0] == cfg_on.num_layers
        assert (values > 0).all(), f"{name} not recorded for every layer: {values}"

    router = "decoder.layers.0.mlp.router.weight"
    assert grads_on[router].abs().sum() > 0
    # The aux losses change the FFN router's gradient (they reach the backward pass) ...
    assert not torch.allclose(grads_on[router], grads_off[router])
    # ... and the last layer's attention router, which they do not depend on, gets the same one.
    attn_router = f"decoder.layers.{cfg_on.num_layers - 1}.self_attention.router.weight"
    assert grads_off[attn_router].abs().sum() > 0
    torch.testing.assert_close(grads_on[attn_router], grads_off[attn_router])


@pytest.mark.parametrize(
    "recompute",
    [
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
        dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp", "moe"]),
    ],
    ids=["full-uniform", "full-block", "selective"],
)
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_activation_recompute_gives_the_same_gradients(single_process, recompute, parallel):
    bam = BAMConfig(attn_experts=2, kv_sharing=True, parallel_block=parallel)
    moe = moe_overrides(2, 2, True, moe_z_loss_coeff=1e-3)
    model, loss, grads = _grads(tiny_config(**moe), bam)
    _, loss_r, grads_r = _grads(tiny_config(**moe, **recompute), bam, model.state_dict())
    assert loss_r == pytest.approx(loss, abs=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_dense_mlp_recompute_in_parallel_block(single_process):
    model, loss, grads = _grads(tiny_config(), BAMConfig())
    sel = dict(recompute_granularity="selective", recompute_modules=["mlp", "core_attn"])
    _, loss_r, grads_r = _grads(tiny_config(**sel), BAMConfig(), model.state_dict())
    assert loss_r == pytest.approx(loss, abs=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], atol=1e-6, rtol=1e-5)


ERRORS = [
    (dict(), dict(attn_experts=3), dict(expert_model_parallel_size=2), "--bam-attn-experts 3 is not divisible by --expert-model-parallel-size 2"),
    (dict(num_attention_heads=6, num_query_groups=6, hidden_size=96), dict(), dict(tensor_model_parallel_size=4), "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (dict(num_query_groups=2), dict(attn_experts=2), dict(tensor_model_parallel_size=4), "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (moe_overrides(3, 2, False), dict(), dict(expert_model_parallel_size=2), "--num-experts 3 is not divisible by --expert-model-parallel-size 2"),
    (moe_overrides(2, 2, True), dict(), dict(tensor_model_parallel_size=2), "need --sequence-parallel"),
    (dict(), dict(), dict(expert_model_parallel_size=2), "needs experts to distribute"),
    (dict(add_bias_linear=True), dict(attn_experts=2), dict(), "attention experts have no biases"),
    (dict(add_qkv_bias=True), dict(attn_experts=2), dict(), "drop --add-qkv-bias"),
    (dict(qk_layernorm=True), dict(attn_experts=2), dict(), "--qk-layernorm is not supported with --bam-attn-experts > 1"),
    (dict(num_layers=3), dict(), dict(pipeline_model_parallel_size=2), "--num-layers 3 is not divisible"),
    (dict(recompute_granularity="selective", recompute_modules=["layernorm"]), dict(), dict(), "--recompute-modules ['layernorm'] are not supported"),
]


@pytest.mark.parametrize("cfg_kwargs,bam_kwargs,layout,message", ERRORS)
def test_invalid_setups_fail_with_one_line(cfg_kwargs, bam_kwargs, layout, message):
    cfg = tiny_config(**cfg_kwargs)
    with pytest.raises(BAMConfigError) as err:
        validate_bam_setup(cfg, BAMConfig(**bam_kwargs), **layout)
    text = str(err.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(attn_experts=0), "--bam-attn-experts must be >= 1"),
        (dict(attn_experts=2, attn_routing="hard"), "--bam-attn-routing must be one of"),
        (dict(attn_experts=2, attn_routing="topk", attn_topk=3), "--bam-attn-topk 3 must be between 1 and --bam-attn-experts 2"),
        (dict(kv_sharing=True), "--bam-kv-sharing needs --bam-attn-experts > 1"),
    ],
)
def test_bam_config_errors(kwargs, message):
    with pytest.raises(BAMConfigError, match=message.replace("[", r"\[").replace("-", r"\-")):
        BAMConfig(**kwargs)


@pytest.mark.parametrize("topk,pre_softmax", [(1, True), (2, False), (3, True)])
def test_local_dispatch_matches_megatron_dispatcher(single_process, topk, pre_softmax):
    """The sync-free local dispatch computes what megatron-core's dispatcher does."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from bam_megatron.model.dispatch import LocalSortTokenDispatcher, enable_local_dispatch

    cfg = tiny_config(**moe_overrides(4, topk, pre_softmax, moe_z_loss_coeff=1e-3))
    sub = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=4).submodules
    ours, ref = MoELayer(cfg, sub, layer_number=1), MoELayer(cfg, sub, layer_number=1)
    assert enable_local_dispatch(ours) == 1
    assert isinstance(ours.token_dispatcher, LocalSortTokenDispatcher)
    assert not isinstance(ref.token_dispatcher, LocalSortTokenDispatcher)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(SEQ, 3, cfg.hidden_size, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, _ = ours(x)
    out_ref, _ = ref(x_ref)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_open_model_features_build_and_are_stored(single_process):
    """--add-qkv-bias (Qwen2), --qk-layernorm (Qwen3) and --rotary-interleaved (Cohere): the
    checkpoint keys they add, and interleaved RoPE changes the result."""
    cfg = tiny_config(add_qkv_bias=True, qk_layernorm=True, num_query_groups=2)
    model = build_bam_model(cfg, BAMConfig(parallel_block=False), vocab_size=VOCAB, max_sequence_length=SEQ)
    shapes = {k: v.global_shape for k, v in model.sharded_state_dict().items() if hasattr(v, "global_shape")}
    dh = cfg.kv_channels
    assert shapes["decoder.layers.0.self_attention.linear_qkv.bias"] == (2, 2 * (2 + 2) * dh)
    assert shapes["decoder.layers.0.self_attention.q_layernorm.weight"] == (2, dh)
    assert shapes["decoder.layers.0.self_attention.k_layernorm.weight"] == (2, dh)
    assert "decoder.layers.0.self_attention.linear_proj.bias" not in shapes
    tokens, position_ids, _ = batch()
    plain = build_bam_model(tiny_config(), BAMConfig(), vocab_size=VOCAB, max_sequence_length=SEQ)
    interleaved = build_bam_model(tiny_config(rotary_interleaved=True), BAMConfig(), vocab_size=VOCAB, max_sequence_length=SEQ)
    interleaved.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(tokens, position_ids, None), interleaved(tokens, position_ids, None))
