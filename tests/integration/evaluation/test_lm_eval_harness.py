"""lm-evaluation-harness runs offline on a tiny Hugging Face model over a bundled task
(``data/tasks/lm_eval/bam_code.yaml`` on the local ``data/tasks/code.jsonl``), and its accuracy
and per-choice log-likelihoods equal this project's scoring rules applied to the same model.

The model is built here from a config and saved with ``save_pretrained`` (nothing is downloaded);
the tokenizer is the bundled one. The same command runs on a BAM model exported to Hugging Face
format (README, "Downstream evaluation").
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from support import REPO_ROOT

from bam_megatron.evaluation.loglikelihood import encode_pair
from bam_megatron.evaluation.multiple_choice import mc_metrics
from bam_megatron.evaluation.tasks import load_task

LIMIT = 8


def _tiny_hf_model(path: str):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than HF's 0.02 init, so that the choices' scores differ
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    model.save_pretrained(path)
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{REPO_ROOT}/data/tokenizer/tokenizer.json", eos_token="<|endoftext|>")
    tok.save_pretrained(path)
    return model.eval(), tok


def _our_scores(model, tok, items):
    """This project's tokenization rule and metrics on the Hugging Face model's log-probs."""
    def tokenize(text):
        return tok.encode(text, add_special_tokens=False)

    lls = []
    for item in items:
        row = []
        for choice in item.choices:
            ctx, cont = encode_pair(tokenize, item.context, choice, tok.eos_token_id)
            seq = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq[:, :-1]).logits[0].float(), -1)
            n = len(cont)
            row.append(sum(logp[seq.shape[1] - 1 - n + i, t].item() for i, t in enumerate(cont)))
        lls.append(row)
    return lls


def test_lm_eval_offline_matches_our_scoring(tmp_path):
    model_dir, out_dir = str(tmp_path / "hf_model"), str(tmp_path / "lm_eval_out")
    model, tok = _tiny_hf_model(model_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--include_path", "data/tasks/lm_eval", "--tasks", "bam_code", "--device", "cpu", "--batch_size", "4",
           "--limit", str(LIMIT), "--output_path", out_dir, "--log_samples"]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    (results_file,) = glob.glob(f"{out_dir}/**/results_*.json", recursive=True)
    metrics = json.load(open(results_file))["results"]["bam_code"]
    (samples_file,) = glob.glob(f"{out_dir}/**/samples_bam_code_*.jsonl", recursive=True)
    samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
    harness_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]

    items = load_task(f"{REPO_ROOT}/data/tasks/code.jsonl")[:LIMIT]
    ours = _our_scores(model, tok, items)
    np.testing.assert_allclose(np.array(ours), np.array(harness_lls), rtol=1e-4, atol=1e-3)
    mine = mc_metrics(items, ours)
    assert metrics["acc,none"] == pytest.approx(mine["acc"])
    assert metrics["acc_norm,none"] == pytest.approx(mine["acc_norm"])
