"""Exported ``BAMForCausalLM`` models behave as transformers models: both attention paths (eager
and sdpa: 1e-5 apart; flex_attention where torch compiles it), ``output_attentions`` /
``output_hidden_states`` equal to the same layer computed by hand here, ``return_dict=False``,
the same through ``generate(return_dict_in_generate=True)``, gradient checkpointing with the
gradients of a plain backward pass, static caches (also allocated up front from the config's
head count) with the tokens of the dynamic cache.

Models: tiny checkpoints of ours (KV experts, shared KV, Nexus BAM with a shared expert) exported
once per module."""

import pytest
import torch
import torch.nn.functional as F
from support.hf import tokens
from support.hf_cases import build_and_save
from transformers import AutoModelForCausalLM
from transformers.configuration_utils import get_head_shapes

from bam_megatron.hf.exporter import ExportOptions, hf_export

CASES = ("bam-kv-experts", "bam-shared-kv", "nexus-bam")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    root = tmp_path_factory.mktemp("bam_transformers")
    out = {}
    init_distributed(seed=1)
    try:
        for case in CASES:
            build_and_save(case, str(root / case / "ckpt"))
            hf_export(str(root / case / "ckpt"), str(root / case / "hf"), ExportOptions(no_tokenizer=True))
            out[case] = str(root / case / "hf")
    finally:
        destroy_distributed()
    return out


def _load(folder: str, attn: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32, attn_implementation=attn).eval()


def _padded_batch():
    """Two prompts, the second left-padded by 3."""
    ids = tokens(batch=2, seq=10, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("case", CASES)
def test_eager_and_sdpa_agree(exported, case):
    eager, sdpa = _load(exported[case], "eager"), _load(exported[case], "sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    ids, mask = _padded_batch()
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            a, b = eager(ids, **kwargs).logits, sdpa(ids, **kwargs).logits
            keep = slice(None) if not kwargs else (mask.bool())
            assert (a[keep] - b[keep]).abs().max().item() <= 1e-5
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    assert torch.equal(eager.generate(ids, **greedy), sdpa.generate(ids, **greedy))


# ------------------------------------------------------------------ one layer by hand


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Halves-layout RoPE on ``x [b, h, s, dh]`` at positions 0..s-1."""
    dh, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    angles = torch.arange(s, dtype=torch.float32)[:, None] * inv
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _swiglu(mlp, x):
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def _heads(t: torch.Tensor, dh: int) -> torch.Tensor:
    b, s, _ = t.shape
    return t.view(b, s, -1, dh).transpose(1, 2)


def _layer0_by_hand(model, x: torch.Tensor):
    """Layer 0 of a parallel-block soft-routed BAM model on ``x [b, s, d]``: the attention
    probabilities ``[b, N·H, s, s]`` (expert-major) and the layer's output."""
    cfg, layer = model.config, model.model.layers[0]
    attn, dh, s = layer.self_attn, cfg.head_dim, x.shape[1]
    h = F.rms_norm(x, (x.shape[-1],), layer.input_layernorm.weight, cfg.norm_eps)
    p_attn = torch.softmax(h @ attn.router.weight.t(), dim=-1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs, out = [], torch.zeros_like(x)
    for e, expert in enumerate(attn.experts):
        k_proj, v_proj = (attn.k_proj, attn.v_proj) if cfg.kv_sharing else (expert.k_proj, expert.v_proj)
        rep = cfg.num_attention_heads // cfg.expert_key_value_heads
        q = _rope(_heads(expert.q_proj(h), dh), cfg.rope_theta)
        k = _rope(_heads(k_proj(h), dh), cfg.rope_theta).repeat_interleave(rep, dim=1)
        v = _heads(v_proj(h), dh).repeat_interleave(rep, dim=1)
        p = torch.softmax((q @ k.transpose(-1, -2) / dh**0.5).masked_fill(~causal, float("-inf")), dim=-1)
        probs.append(p)
        out = out + p_attn[..., e : e + 1] * expert.o_proj((p @ v).transpose(1, 2).reshape(*x.shape[:2], -1))
    moe = layer.mlp
    if cfg.router_type == "nexus":
        r = moe.router
        gate, up = (r.domain_embeddings @ r.projection_fc1.weight.t()).chunk(2, dim=-1)
        logits = h @ ((F.silu(gate) * up) @ r.projection_fc2.weight.t()).t()
    else:
        logits = h @ moe.router.weight.t()
    weights, chosen = torch.softmax(logits, dim=-1).topk(cfg.num_experts_per_tok, dim=-1)  # pre-softmax top-k
    ffn = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        w = (weights * (chosen == e)).sum(-1, keepdim=True)
        ffn = ffn + w * _swiglu(expert, h)
    if cfg.shared_expert_intermediate_size:
        ffn = ffn + _swiglu(moe.shared_expert, h)
    return torch.cat(probs, dim=1), x + out + ffn


@pytest.mark.parametrize("case", CASES)
def test_output_attentions_and_hidden_states_are_the_layer_by_hand(exported, case):
    ids = tokens(batch=2, seq=7, seed=5)
    for attn in ("eager", "sdpa"):  # sdpa computes a call that asks for the probabilities eagerly
        model = _load(exported[case], attn)
        cfg = model.config
        with torch.no_grad():
            out = model(ids, output_attentions=True, output_hidden_states=True)
            L, N, H = cfg.num_hidden_layers, cfg.num_attention_experts, cfg.num_attention_heads
            assert len(out.attentions) == L and len(out.hidden_states) == L + 1
            assert all(a.shape == (2, N * H, 7, 7) for a in out.attentions)
            assert all(h.shape == (2, 7, cfg.hidden_size) for h in out.hidden_states)
            torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
            torch.testing.assert_close(out.hidden_states[-1], model.model(ids).last_hidden_state)
            probs, y = _layer0_by_hand(model, out.hidden_states[0])
            torch.testing.assert_close(out.attentions[0], probs, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.hidden_states[1], y, atol=1e-5, rtol=1e-4)
            plain = model(ids)
            assert plain.attentions is None and plain.hidden_states is None


def test_return_dict_false_gives_a_tuple(exported):
    model = _load(exported["nexus-bam"])
    ids = tokens(batch=2, seq=6)
    with torch.no_grad():
        as_dict = model(ids, labels=ids)
        as_tuple = model(ids, labels=ids, return_dict=False)
        hidden = model.model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(hidden, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    torch.testing.assert_close(hidden[0], model.model(ids).last_hidden_state)


def test_generate_returns_attentions_and_hidden_states(exported):
    model = _load(exported["bam-shared-kv"])
    ids, new = tokens(batch=2, seq=5), 3
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_attentions=True, output_hidden_states=True)
    cfg = model.config
    heads, L = cfg.num_attention_experts * cfg.num_attention_heads, cfg.num_hidden_layers
    assert out.sequences.shape == (2, 5 + new) and len(out.attentions) == new == len(out.hidden_states)
    for step in range(new):
        q, t = (5, 5) if step == 0 else (1, 5 + step)
        assert len(out.attentions[step]) == L and all(a.shape == (2, heads, q, t) for a in out.attentions[step])
        assert len(out.hidden_states[step]) == L + 1 and all(h.shape == (2, q, cfg.hidden_size) for h in out.hidden_states[step])
    with torch.no_grad():  # the first step's probabilities are the full forward's
        full = model(ids, output_attentions=True)
    torch.testing.assert_close(out.attentions[0][0], full.attentions[0])


@pytest.mark.parametrize("case", ["bam-kv-experts", "nexus-bam"])
def test_gradient_checkpointing_gives_the_same_gradients(exported, case):
    model = _load(exported[case]).train()
    assert model.supports_gradient_checkpointing
    ids = tokens(batch=2, seq=8, seed=6)
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))

    def gradients():
        calls.clear()
        model.zero_grad()
        model(ids, labels=ids, use_cache=False, output_router_logits=True).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = gradients()
    model.gradient_checkpointing_enable()
    checkpointed, recomputed_calls = gradients()
    assert model.is_gradient_checkpointing and (plain_calls, recomputed_calls) == (1, 2)  # the layer ran again in backward
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-7, rtol=1e-6, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_static_cache_generates_the_dynamic_cache_tokens(exported, case):
    model = _load(exported[case])
    cfg = model.config
    experts = 1 if cfg.kv_sharing else cfg.num_attention_experts
    assert get_head_shapes(cfg) == (experts * cfg.expert_key_value_heads, cfg.head_dim)  # what caches are sized from
    ids, mask = _padded_batch()
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=mask)
    dynamic = model.generate(ids, **greedy)
    assert torch.equal(model.generate(ids, cache_implementation="static", **greedy), dynamic)
    # chunked prefill allocates the static cache up front from the config's head count
    assert torch.equal(model.generate(ids, cache_implementation="static", prefill_chunk_size=4, **greedy), dynamic)


def test_flex_attention_agrees_with_sdpa(exported):
    """flex_attention (torch.compile'd; about 20 s of compilation on a CPU)."""
    flex, sdpa = _load(exported["bam-shared-kv"], "flex_attention"), _load(exported["bam-shared-kv"], "sdpa")
    ids, mask = _padded_batch()
    with torch.no_grad():
        a, b = flex(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits
    assert (a[mask.bool()] - b[mask.bool()]).abs().max().item() <= 1e-5


def test_auto_map_loads_every_auto_class_and_save_pretrained_carries_the_code(exported, tmp_path):
    from transformers import AutoConfig, AutoModel

    folder = exported["nexus-bam"]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert set(config.auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    model = _load(folder)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = tokens(batch=1, seq=5)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, model.model(ids).last_hidden_state)
    model.save_pretrained(str(tmp_path / "again"))
    assert {"configuration_bam.py", "modeling_bam.py"} <= set(p.name for p in (tmp_path / "again").iterdir())
    with torch.no_grad():
        torch.testing.assert_close(_load(str(tmp_path / "again"))(ids).logits, model(ids).logits)
