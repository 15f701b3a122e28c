"""lm-evaluation-harness runs offline on a tiny Hugging Face model over a bundled task
(``data/tasks/lm_eval/bam_code.yaml`` on the local ``data/tasks/code.jsonl``), and its accuracy
and per-choice log-likelihoods equal this project's scorer's (``tools/evaluate_bam.py --tasks``)
on the same model imported with ``tools/hf_import.py``.

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

from bam_megatron.evaluation.checkpoint_tasks import evaluate_checkpoint_on_tasks
from bam_megatron.hf.importer import ImportOptions, hf_import

LIMIT = 8
TASK = f"{REPO_ROOT}/data/tasks/code.jsonl"


def _tiny_hf_model(path: str) -> None:
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


def _our_scores(model_dir: str, ckpt: str) -> dict:
    """This project's scorer (``tools/evaluate_bam.py --tasks``) on the same model: imported with
    ``tools/hf_import.py``'s code, then scored by ``evaluate_checkpoint_on_tasks``."""
    hf_import(model_dir, ckpt, ImportOptions(sync=False))
    return evaluate_checkpoint_on_tasks(ckpt, [("bam_code", TASK)], limit=LIMIT, batch_size=4)["bam_code"]


def test_lm_eval_offline_matches_our_scoring(tmp_path):
    model_dir, out_dir = str(tmp_path / "hf_model"), str(tmp_path / "lm_eval_out")
    _tiny_hf_model(model_dir)
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

    ours = _our_scores(model_dir, str(tmp_path / "imported"))
    assert ours["n"] == LIMIT == len(harness_lls)
    np.testing.assert_allclose(np.array(ours["loglikelihoods"]), np.array(harness_lls), rtol=1e-4, atol=1e-3)
    assert metrics["acc,none"] == pytest.approx(ours["acc"])
    assert metrics["acc_norm,none"] == pytest.approx(ours["acc_norm"])
