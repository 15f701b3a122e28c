"""tools/hf_import.py reads ``BAMForCausalLM`` folders back: ours -> BAMForCausalLM -> ours is the
same checkpoint bit for bit (every kind of model: BTX, BAM KV experts / shared KV, Nexus with the
shared expert, learned positions, GELU, LayerNorm), and a model fine-tuned in transformers with PEFT
LoRA and merged imports to a checkpoint whose logits are the merged model's, which trains on."""

import os

import pytest
import torch
from support.checkpoints import common_state
from support.hf import hf_logits, load_ours, our_logits, tokens
from support.hf_cases import EXPORT_CASES, build_and_save, load_export
from transformers import AutoTokenizer

from bam_megatron.checkpoint.opener import resolve_checkpoint_dir
from bam_megatron.checkpoint.weights import read_global_tensors
from bam_megatron.cli import hf_import as import_cli
from bam_megatron.hf.exporter import ExportOptions, hf_export
from bam_megatron.hf.importer import ImportOptions, hf_import
from bam_megatron.upcycle.mapping import canonical_key

TOL = 1e-4


def _tensors(root: str) -> dict:
    stored = read_global_tensors(os.path.join(root, "iter_0000000"))
    return {canonical_key(k): v for k, v in stored.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_ours_to_bam_to_ours_is_the_same_checkpoint(single_process, tmp_path, case):
    build_and_save(case, str(tmp_path / "ckpt"))
    hf_export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), ExportOptions(architecture="bam"))
    result = hf_import(str(tmp_path / "hf"), str(tmp_path / "back"), ImportOptions(seq_length=32))
    assert result.architecture == "BAMForCausalLM"
    before, after = _tensors(str(tmp_path / "ckpt")), _tensors(str(tmp_path / "back"))
    assert set(after) == set(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    args = common_state(resolve_checkpoint_dir(str(tmp_path / "back")))["args"]
    original = common_state(resolve_checkpoint_dir(str(tmp_path / "ckpt")))["args"]
    for name in ("moe_router_type", "nexus_domain_size", "nexus_projection_size", "moe_shared_expert_intermediate_size",
                 "num_experts", "bam_attn_experts", "bam_kv_sharing", "bam_sequential_block", "position_embedding_type"):
        assert args[name] == original[name], name


def test_peft_lora_fine_tune_merged_imports_and_trains_on(single_process, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from bam_megatron.parallel.distributed import destroy_distributed
    from bam_megatron.training import pretrain

    build_and_save("nexus-bam", str(tmp_path / "ckpt"), tokenizer=True)
    hf_export(str(tmp_path / "ckpt"), str(tmp_path / "hf"), ExportOptions())
    model = load_export(str(tmp_path / "hf")).train()
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = tokens(batch=4, seq=16, seed=8)
    for _ in range(3):
        optimizer.zero_grad()
        lora(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    merged = lora.merge_and_unload().eval()
    merged.save_pretrained(str(tmp_path / "merged"))
    AutoTokenizer.from_pretrained(str(tmp_path / "hf")).save_pretrained(str(tmp_path / "merged"))
    expected = hf_logits(merged, tokens(seq=16))
    assert (expected - hf_logits(load_export(str(tmp_path / "hf")), tokens(seq=16))).abs().max().item() > 1e-2  # it learned

    capsys.readouterr()
    assert import_cli.main([str(tmp_path / "merged"), "-o", str(tmp_path / "tuned"), "--seq-length", "32"]) == 0
    assert "imported BAMForCausalLM" in capsys.readouterr().out
    got = our_logits(load_ours(str(tmp_path / "tuned")), tokens(seq=16))
    assert (got - expected).abs().max().item() <= TOL
    assert (tmp_path / "tuned" / "tokenizer" / "tokenizer.json").is_file()

    destroy_distributed()  # pretrain sets up its own process group
    trained = str(tmp_path / "trained")
    summary = pretrain([
        "--use-checkpoint-args", "--load", trained, "--save", trained, "--pretrained-checkpoint", str(tmp_path / "tuned"),
        "--mock-data", "--train-iters", "2", "--lr", "1e-4", "--micro-batch-size", "2", "--eval-iters", "1",
        "--eval-interval", "1000", "--log-interval", "1",
    ])
    assert summary["iteration"] == 2 and torch.isfinite(torch.tensor(summary["valid"]["valid"]))
    result = hf_export(trained, str(tmp_path / "again"), ExportOptions())
    assert result.architecture == "BAMForCausalLM" and result.spec.is_nexus and "tokenizer.json" in result.files
