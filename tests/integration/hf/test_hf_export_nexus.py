"""Nexus models leave too: Nexus BTX (dense attention) and Nexus BAM (attention experts), both with
the shared FFN expert, export as ``BAMForCausalLM`` with our logits (fp32, 1e-4) and our greedy
tokens — from a checkpoint saved at one process, and from the same model saved by a 2-process gloo
run at EP2 (Nexus BTX) and TP2 (Nexus BAM; a Nexus BAM model has one attention expert more than
routed FFN experts, so EP must be 1: README, Limits)."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from support.checkpoints import index_of
from support.dist_harness import run_distributed
from support.hf import hf_logits, our_logits, tokens
from support.hf_cases import build_and_save, load_export
from test_hf_export_layouts import layout_worker

from bam_megatron.hf.exporter import ExportOptions, hf_export

TOL = 1e-4
CASES = ("nexus-btx", "nexus-bam")
LAYOUTS = {"nexus-btx": (1, 1, 2), "nexus-bam": (2, 1, 1)}  # (TP, PP, EP)
PROMPT, NEW = 6, 10


def _our_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation by full recomputation with our megatron-core model."""
    for _ in range(steps):
        ids = torch.cat([ids, our_logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _check_export(folder: str, expected_logits: torch.Tensor, expected_greedy: torch.Tensor) -> None:
    model = load_export(folder)
    got = hf_logits(model, tokens(seq=16))
    assert (got - expected_logits).abs().max().item() <= TOL
    prompt = expected_greedy[:, :PROMPT]
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected_greedy)


@pytest.mark.parametrize("case", CASES)
def test_nexus_export_gives_our_logits_and_greedy_tokens(single_process, tmp_path, case):
    model = build_and_save(case, str(tmp_path / "ckpt"))
    result = hf_export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), ExportOptions())
    spec = result.spec
    assert result.architecture == "BAMForCausalLM" and spec.is_nexus and spec.shared_expert_ffn == 80
    assert spec.attn_experts == (4 if case == "nexus-bam" else 1)
    with open(tmp_path / "hf" / "config.json") as f:
        config = json.load(f)
    assert config["router_type"] == "nexus" and config["shared_expert_intermediate_size"] == 80
    greedy = _our_greedy(model, tokens(seq=PROMPT, seed=3), NEW)
    _check_export(str(tmp_path / "hf"), our_logits(model, tokens(seq=16)), greedy)

    # --dtype casts the weights, not the fixed domain embeddings (float32, as trained)
    hf_export(str(tmp_path / "ckpt"), str(tmp_path / "bf16"), ExportOptions(dtype=torch.bfloat16))
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.router.domain_embeddings").get_dtype() == "F32"
        assert f.get_slice("model.layers.0.mlp.router.projection_fc1.weight").get_dtype() == "BF16"
    bf16 = load_export(str(tmp_path / "bf16"))
    assert bf16.model.layers[0].mlp.router.domain_embeddings.dtype == torch.float32


def test_nexus_exports_of_checkpoints_saved_at_ep2_and_tp2(single_process, tmp_path):
    one, greedy = {}, {}
    for case in CASES:
        model = build_and_save(case, str(tmp_path / f"{case}-1"))
        one[case] = our_logits(model, tokens(seq=16))
        greedy[case] = _our_greedy(model, tokens(seq=PROMPT, seed=3), NEW)
    runs = [(LAYOUTS[c], [(c, str(tmp_path / f"{c}-1"), str(tmp_path / f"{c}-2"))]) for c in CASES]
    two = run_distributed(layout_worker, 2, runs, timeout_s=600)[0]
    for case in CASES:
        assert (two[case] - one[case]).abs().max().item() <= TOL, case
        ranks = {f.split("_")[2] for f in os.listdir(tmp_path / f"{case}-2" / "iter_0000000") if f.endswith(".distcp")}
        assert ranks == {"0", "1"}, case  # written by both ranks (files __<rank>_<n>.distcp)
        md = index_of(str(tmp_path / f"{case}-2" / "iter_0000000")).state_dict_metadata
        split = [k for k, v in md.items() if hasattr(v, "chunks") and len(v.chunks) > 2]  # more than one chunk per layer
        assert split, case  # TP2 splits the attention, EP2 the experts
        result = hf_export(str(tmp_path / f"{case}-2"), str(tmp_path / f"{case}-hf"), ExportOptions())
        assert result.spec.is_nexus and result.spec.shared_expert_ffn == 80
        _check_export(str(tmp_path / f"{case}-hf"), two[case], greedy[case])
