"""Checkpoints that carry what they need: a Hugging Face model imported, its checkpoint moved and
renamed, then mixed, trained, generated from (text prompts: the tokenizer travels with every
checkpoint) and exported — every step a separate program run from a different working
directory with relative paths — and the export generates the same tokens in transformers."""

import json
import os
import subprocess
import sys

from support import REPO_ROOT
from support.hf import make_hf_model
from support.training import subprocess_env

TOOLS = os.path.join(REPO_ROOT, "tools")


def _run(cwd, script, *argv, timeout=300):
    os.makedirs(cwd, exist_ok=True)
    proc = subprocess.run([sys.executable, script, *argv], cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{os.path.basename(script)} {argv}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_import_move_mix_train_generate_export_from_anywhere(tmp_path):
    make_hf_model(str(tmp_path / "hf"), "LlamaConfig")
    _run(tmp_path / "w1", os.path.join(TOOLS, "hf_import.py"), "../hf", "-o", "../imported/seed", "--seq-length", "32", "-q")
    os.makedirs(tmp_path / "moved")
    os.rename(tmp_path / "imported" / "seed", tmp_path / "moved" / "llama-seed")  # moved and renamed
    os.rmdir(tmp_path / "imported")
    _run(tmp_path / "w2", os.path.join(TOOLS, "upcycle_bam.py"), "-q", "-o", "../mix",
         "../moved/llama-seed", "../moved/llama-seed")
    assert os.path.isfile(tmp_path / "mix" / "tokenizer" / "tokenizer.json")
    _run(tmp_path / "w3", os.path.join(REPO_ROOT, "pretrain_bam.py"), "--use-checkpoint-args",
         "--pretrained-checkpoint", "../mix", "--load", "../trained", "--save", "../trained", "--mock-data",
         "--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-4",
         "--eval-iters", "1", "--log-interval", "1")
    os.rename(tmp_path / "trained", tmp_path / "moved" / "bam")  # and the trained one moves too
    out = _run(tmp_path / "w4", os.path.join(TOOLS, "generate.py"), "--load", "../moved/bam", "--prompt", "t1 t2 t3 t4",
               "--greedy", "--max-new-tokens", "5", "--ignore-eos", "--output-format", "json", "-q")
    ours = json.loads(out)
    assert len(ours["generated_ids"]) == 5 and ours["prompt_ids"] == [1, 2, 3, 4]
    _run(tmp_path / "w5", os.path.join(TOOLS, "hf_export.py"), "../moved/bam", "-o", "../export", "-q")

    import torch
    import transformers

    folder = str(tmp_path / "export")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = tok("t1 t2 t3 t4", return_tensors="pt", add_special_tokens=False).input_ids
    assert ids.tolist() == [ours["prompt_ids"]]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated[0, ids.shape[1]:].tolist() == ours["generated_ids"]
