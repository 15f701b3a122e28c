"""Open models as seeds, end to end: an imported model trains with ``pretrain_bam.py --load
--use-checkpoint-args``, and four identical imported seeds, mixed by the upcycle tool and
exported, give the seed's logits in transformers (the upcycling identity through both tools)."""

import pytest
import torch
from support.hf import hf_logits, tokens
from support.hf_cases import load_export

from bam_megatron.hf.exporter import ExportOptions, hf_export
from bam_megatron.hf.importer import ImportOptions, hf_import
from bam_megatron.upcycle.mix import upcycle
from bam_megatron.upcycle.plan import UpcycleOptions

TOL = 1e-4

# name: (imported architecture, upcycle options, class of the export)
IDENTITY_CASES = {
    "cohere/kv-experts/ffn-top-N": ("cohere", dict(mode="full", moe_router_topk=4, moe_router_pre_softmax=True), "BAMForCausalLM"),
    "llama-gqa/shared-kv/ffn-top2-renormalised": (
        "llama", dict(mode="shared-kv", moe_router_topk=2, moe_router_pre_softmax=False, attn_routing="topk", attn_topk=2),
        "BAMForCausalLM"),
    "llama/btx/ffn-top2-renormalised": ("llama", dict(mode="merged", moe_router_topk=2, moe_router_pre_softmax=False),
                                        "MixtralForCausalLM"),
    "qwen2/btx": ("qwen2", dict(mode="merged", moe_router_topk=2, moe_router_pre_softmax=False), "BAMForCausalLM"),
    "qwen3/btx": ("qwen3", dict(mode="merged", moe_router_topk=4, moe_router_pre_softmax=True), "BAMForCausalLM"),
}


@pytest.mark.parametrize("name", list(IDENTITY_CASES))
def test_four_identical_imported_seeds_upcycled_and_exported_give_the_seed(hf_models, tmp_path, name):
    arch, options, exported_as = IDENTITY_CASES[name]
    folder, model = hf_models[arch]
    seed = str(tmp_path / "seed")
    hf_import(folder, seed, ImportOptions())
    upcycle([seed] * 4, str(tmp_path / "moe"), UpcycleOptions(router_std=0.5, **options))
    result = hf_export(str(tmp_path / "moe"), str(tmp_path / "hf"), ExportOptions(no_tokenizer=True))
    assert result.architecture == exported_as
    assert result.spec.num_experts == 4 and result.spec.attn_experts == (1 if options["mode"] == "merged" else 4)
    ids = tokens()
    assert (hf_logits(load_export(str(tmp_path / "hf")), ids) - hf_logits(model, ids)).abs().max().item() <= TOL


def test_imported_seed_trains_with_its_recorded_arguments(hf_models, tmp_path):
    """``--use-checkpoint-args`` takes the model, the tokenizer (copied beside the checkpoint,
    recorded relative to it) and no-dropout from the import; the result exports again."""
    from support.checkpoints import common_state

    from bam_megatron.checkpoint.opener import resolve_checkpoint_dir
    from bam_megatron.training import pretrain

    folder, _ = hf_models["qwen3"]
    ckpt = tmp_path / "seed"
    hf_import(folder, str(ckpt), ImportOptions(seq_length=32))
    trained = str(tmp_path / "trained")
    summary = pretrain([
        "--use-checkpoint-args", "--load", trained, "--save", trained, "--pretrained-checkpoint", str(ckpt),
        "--mock-data", "--train-iters", "2", "--lr", "1e-4", "--micro-batch-size", "2", "--eval-iters", "1",
        "--eval-interval", "1000", "--log-interval", "1",
    ])
    assert summary["iteration"] == 2 and torch.isfinite(torch.tensor(summary["valid"]["valid"]))
    args = common_state(resolve_checkpoint_dir(trained))["args"]
    assert args["tokenizer_type"] == "HuggingFaceTokenizer" and args["hidden_dropout"] == 0.0
    result = hf_export(trained, str(tmp_path / "hf"), ExportOptions())
    assert result.architecture == "Qwen3ForCausalLM" and "tokenizer.json" in result.files


@pytest.mark.parametrize("arch,needle", [("qwen2", "--add-qkv-bias"), ("qwen3", "--qk-layernorm")])
def test_attention_experts_refuse_seeds_they_cannot_copy(hf_models, tmp_path, arch, needle):
    """Attention experts have no biases and no query/key norms: such seeds mix only as BTX."""
    from bam_megatron.errors import UpcycleError

    seed = str(tmp_path / "seed")
    hf_import(hf_models[arch][0], seed, ImportOptions())
    for mode in ("full", "shared-kv"):
        with pytest.raises(UpcycleError, match=needle):
            upcycle([seed] * 2, str(tmp_path / mode), UpcycleOptions(mode=mode))
        assert not (tmp_path / mode).exists()


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_the_seeds_chat_template_reaches_the_exported_mix(hf_models, tmp_path, where):
    """A seed's chat template (in ``tokenizer_config.json`` or ``chat_template.jinja``) goes with its
    tokenizer through the import, the mix (which carries the seed's tokenizer files in its own
    ``tokenizer/`` folder) and the export, so the exported model chats with the seed's template."""
    import json
    import shutil

    import transformers

    folder = tmp_path / "seed_hf"
    shutil.copytree(hf_models["llama"][0], folder)
    if where == "chat_template.jinja":
        (folder / where).write_text(TEMPLATE)
    else:
        config = json.loads((folder / where).read_text())
        (folder / where).write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    hf_import(str(folder), str(tmp_path / "seed"), ImportOptions())
    upcycle([str(tmp_path / "seed")] * 2, str(tmp_path / "moe"), UpcycleOptions(mode="full"))
    result = hf_export(str(tmp_path / "moe"), str(tmp_path / "hf"), ExportOptions())
    assert result.architecture == "BAMForCausalLM" and where in result.files
    messages = [{"role": "user", "content": "t5 t6"}]
    seed_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.chat_template == seed_tok.chat_template == TEMPLATE
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<user> t5 t6 <assistant>" == seed_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
