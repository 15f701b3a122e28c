"""tools/hf_export.py at one process: every kind of model leaves exactly, in the class that holds it.

Our model (random weights redrawn N(0, 1/fan_in), saved by megatron-core's torch_dist writer)
and transformers' model loaded from the export give the same logits (fp32); Hugging Face ->
ours -> Hugging Face reproduces the original logits; ``generate()`` with the KV cache equals
greedy decoding by recomputation.
"""

import os

import pytest
import torch
import transformers
from support.hf import hf_logits, our_logits, tokens
from support.hf_cases import EXPORT_CASES, IMPORT_CASES, build_and_save, load_export

from bam_megatron.cli import hf_export as cli
from bam_megatron.hf.exporter import ExportOptions, hf_export
from bam_megatron.hf.importer import ImportOptions, hf_import

TOL = 1e-4


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_gives_our_logits(single_process, tmp_path, case):
    model = build_and_save(case, str(tmp_path / "ckpt"))
    result = hf_export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), ExportOptions())
    assert result.architecture == EXPORT_CASES[case][3]
    ids = tokens(seq=16)
    expected, got = our_logits(model, ids), hf_logits(load_export(str(tmp_path / "hf")), ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", list(IMPORT_CASES))
def test_hugging_face_to_ours_to_hugging_face(hf_models, tmp_path, name):
    folder, model = hf_models[name]
    hf_import(folder, str(tmp_path / "ckpt"), ImportOptions())
    result = hf_export(str(tmp_path / "ckpt"), str(tmp_path / "back"), ExportOptions())
    expected_class = "LlamaForCausalLM" if name == "mistral" else type(model).__name__
    assert result.architecture == expected_class
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(result.files)
    ids = tokens()
    assert (hf_logits(load_export(str(tmp_path / "back")), ids) - hf_logits(model, ids)).abs().max().item() <= TOL
    text = "t7 t3 <eos>"
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))(text)["input_ids"]
    assert back == transformers.AutoTokenizer.from_pretrained(folder)(text)["input_ids"]


def _greedy_by_recomputation(model, ids, steps):
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("case,kv_heads", [("bam-kv-experts", 4 * 4), ("bam-shared-kv", 2)])
def test_generate_with_the_cache_equals_recomputation(single_process, tmp_path, capsys, case, kv_heads):
    build_and_save(case, str(tmp_path / "ckpt"))
    assert cli.main([str(tmp_path / "ckpt"), "-o", str(tmp_path / "hf")]) == 0
    assert "exported BAMForCausalLM" in capsys.readouterr().out
    assert {"configuration_bam.py", "modeling_bam.py"} <= set(os.listdir(tmp_path / "hf"))
    model = load_export(str(tmp_path / "hf"))
    ids = tokens(batch=2, seq=6)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy_by_recomputation(model, ids, 10))
    with torch.no_grad():  # the cache: KV experts one set of G heads per expert, shared KV one set
        step = model(ids, use_cache=True)
    keys = step.cache.layers[0].keys if hasattr(step, "cache") else step.past_key_values.layers[0].keys
    assert keys.shape[1] == kv_heads
    routed = model(ids, output_router_logits=True, labels=ids)
    assert len(routed.router_logits) == 2 and len(routed.attention_router_logits) == 2
    assert routed.router_logits[0].shape == (ids.numel(), 4) and routed.aux_loss is not None
