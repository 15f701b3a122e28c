"""The pure rules of adding an expert (``upcycle/extension.py``), the shared-expert mapping of the
Mix phase, the Nexus router tensors and the domain-embeddings file."""

import pytest
import torch

from bam_megatron.errors import UpcycleError
from bam_megatron.upcycle import extension as X
from bam_megatron.upcycle import mapping as U
from bam_megatron.upcycle import nexus

LP = U.LAYER_PREFIX
ATTN = U.AttentionShape(num_attention_heads=4, num_query_groups=2, head_dim=8)  # qkv rows 2*(2+2)*8 = 64


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key,moa,kind,source", [
    (LP + "mlp.experts.experts.linear_fc1.weight", True, X.APPEND, LP + "mlp.linear_fc1.weight"),
    (LP + "self_attention.linear_qkv.weight", True, X.APPEND, LP + "self_attention.linear_qkv.weight"),
    (LP + "self_attention.linear_qkv.weight", False, X.MERGE, LP + "self_attention.linear_qkv.weight"),
    (LP + "self_attention.linear_proj.weight", True, X.APPEND, LP + "self_attention.linear_proj.weight"),
    (LP + "self_attention.linear_q.weight", True, X.APPEND_Q, X.QKV),
    (LP + "self_attention.linear_kv.weight", True, X.MERGE_KV, X.QKV),
    (U.ATTN_ROUTER_KEY, True, X.ROUTER_ROW, None),
    (U.FFN_ROUTER_KEY, False, X.ROUTER_ROW, None),
    (U.NEXUS_DOMAIN_KEY, False, X.DOMAIN, None),
    (U.NEXUS_FC1_KEY, False, X.COPY, None),
    (U.SHARED_FC1_KEY, True, X.COPY, None),
    (LP + "input_layernorm.weight", True, X.MERGE, LP + "input_layernorm.weight"),
    ("embedding.word_embeddings.weight", True, X.MERGE, "embedding.word_embeddings.weight"),
])
def test_every_key_has_its_rule(key, moa, kind, source):
    assert X.extension_rule(key, moa) == X.ExtendRule(kind, source)


def test_append_keeps_old_experts_and_adds_the_dense_tensor_bit_for_bit():
    moe, dense = _t(2, 3, 16, 8, seed=1), _t(2, 16, 8, seed=2)
    out = X.extend_tensor(X.ExtendRule(X.APPEND, "x"), moe, dense, merge_weight=0.25, attn=ATTN)
    assert out.shape == (2, 4, 16, 8)
    assert torch.equal(out[:, :3], moe) and torch.equal(out[:, 3], dense)


def test_shared_kv_takes_the_query_rows_and_merges_the_key_value_rows():
    qkv = _t(2, 64, 32, seed=3)
    q, kv = U.split_qkv(qkv, ATTN)
    moe_q, moe_kv = _t(2, 3, 32, 32, seed=4), _t(2, 32, 32, seed=5)
    out_q = X.extend_tensor(X.ExtendRule(X.APPEND_Q, X.QKV), moe_q, qkv, merge_weight=0.25, attn=ATTN)
    assert torch.equal(out_q[:, 3], q) and torch.equal(out_q[:, :3], moe_q)
    out_kv = X.extend_tensor(X.ExtendRule(X.MERGE_KV, X.QKV), moe_kv, qkv, merge_weight=0.25, attn=ATTN)
    assert torch.equal(out_kv, U.average([moe_kv, kv], [0.75, 0.25]))
    torch.testing.assert_close(out_kv.double(), 0.75 * moe_kv.double() + 0.25 * kv.double(), atol=1e-6, rtol=0)


def test_router_rows_and_domain_embeddings():
    router = _t(2, 3, 16, seed=6)
    out = X.extend_tensor(X.ExtendRule(X.ROUTER_ROW, None), router, None, merge_weight=0.2, attn=ATTN)
    assert torch.equal(out[:, :3], router)
    torch.testing.assert_close(out[:, 3], router.mean(dim=1))
    domains, new = _t(2, 3, 8, seed=7), _t(8, seed=8)
    out = X.extend_tensor(X.ExtendRule(X.DOMAIN, None), domains, None, merge_weight=0.2, attn=ATTN, domain=new)
    assert torch.equal(out[:, :3], domains) and torch.equal(out[:, 3], new.expand(2, 8))
    copied = _t(2, 5, seed=9)
    assert X.extend_tensor(X.ExtendRule(X.COPY, None), copied, None, merge_weight=0.2, attn=ATTN) is copied


def test_expected_dense_shapes():
    assert X.expected_dense_shape(X.ExtendRule(X.APPEND, "x"), (2, 3, 16, 8), ATTN) == (2, 16, 8)
    assert X.expected_dense_shape(X.ExtendRule(X.APPEND_Q, X.QKV), (2, 3, 32, 32), ATTN) == (2, 64, 32)
    assert X.expected_dense_shape(X.ExtendRule(X.MERGE, "x"), (7, 5), ATTN) == (7, 5)
    assert X.grown_shape((2, 3, 16)) == (2, 4, 16)
    assert nexus.default_merge_weight(3) == 0.25


def test_shared_expert_mix_rule():
    key = LP + "mlp.linear_fc1.weight"
    rule = U.tensor_rule(key, "full", shared_expert=True)
    assert rule == U.Rule(U.SHARED_STACK, (U.SHARED_FC1_KEY, LP + "mlp.experts.experts.linear_fc1.weight"))
    seeds = [_t(2, 16, 8, seed=s) for s in range(3)]
    out = U.upcycle_tensor(key, seeds, mode="full", shape=ATTN, shared_expert=True)
    assert torch.equal(out[U.SHARED_FC1_KEY], seeds[0])
    assert torch.equal(out[rule.outputs[1]], torch.stack(seeds[1:], dim=1))
    assert U.upcycled_shapes(key, (2, 16, 8), 3, "full", ATTN, shared_expert=True) == {
        U.SHARED_FC1_KEY: (2, 16, 8), rule.outputs[1]: (2, 2, 16, 8)}


def test_nexus_router_tensors():
    domains = _t(3, 8, seed=10)
    gen = torch.Generator().manual_seed(0)
    t = nexus.nexus_router_tensors(domains, 2, 16, 12, init="random", std=0.02, generator=gen, dtype=torch.float32)
    assert torch.equal(t[U.NEXUS_DOMAIN_KEY], domains.expand(2, 3, 8))
    assert t[U.NEXUS_FC1_KEY].shape == (2, 24, 8) and t[U.NEXUS_FC2_KEY].shape == (2, 16, 12)
    assert 0.01 < t[U.NEXUS_FC1_KEY].std() < 0.03
    zero = nexus.nexus_router_tensors(domains, 2, 16, 12, init="zero", std=0.02, generator=gen, dtype=torch.float32)
    assert zero[U.NEXUS_FC2_KEY].abs().sum() == 0 and zero[U.NEXUS_FC1_KEY].abs().sum() > 0  # learnable


def test_domain_embeddings_file(tmp_path):
    path = str(tmp_path / "d.pt")
    de = nexus.DomainEmbeddings(["code", "math"], _t(2, 8, seed=11), {"checkpoint": "/x", "tokens": {"code": 5}})
    nexus.save_domain_embeddings(de, path)
    back = nexus.load_domain_embeddings(path)
    assert back.names == ["code", "math"] and torch.equal(back.embeddings, de.embeddings)
    assert back.provenance["tokens"] == {"code": 5} and back.describe()["file"] == path
    assert torch.equal(back.select(["math"]).embeddings, de.embeddings[1:])
    with pytest.raises(UpcycleError, match="has no domain 'law'; it holds code, math"):
        back.select(["law"])
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(UpcycleError, match="is not a domain-embeddings file"):
        nexus.load_domain_embeddings(str(tmp_path / "bad.pt"))
    with pytest.raises(UpcycleError, match="do not exist"):
        nexus.load_domain_embeddings(str(tmp_path / "none.pt"))
    with pytest.raises(UpcycleError, match="gives 2 domain embeddings .* for 3 routed FFN experts"):
        nexus.load_upcycle_domains(path, None, 3)
    with pytest.raises(UpcycleError, match="--merge-weight"):
        nexus.check_merge_weight(1.0)
