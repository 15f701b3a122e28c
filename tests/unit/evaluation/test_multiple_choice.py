"""Multiple-choice scoring equals a reference computed here from the model's own log-probs;
lm-evaluation-harness's tokenization rule, metrics, few-shot prompts and task-file errors."""

import json
import math

import numpy as np
import pytest
import torch
from support import REPO_ROOT

from bam_megatron.errors import InferenceError
from bam_megatron.evaluation.loglikelihood import encode_pair
from bam_megatron.evaluation.multiple_choice import mc_metrics, score_task
from bam_megatron.evaluation.tasks import MCItem, fewshot_prefix, load_task

TASK = f"{REPO_ROOT}/data/tasks/code.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    from bam_megatron.data.tokenizers import build_tokenizer

    return build_tokenizer("HuggingFaceTokenizer", tokenizer_model=f"{REPO_ROOT}/data/tokenizer/tokenizer.json")


@pytest.fixture(scope="module")
def bam_model():
    from support.cpu_runtime import cpu_runtime_scope
    from support.generation import kind_configs

    from bam_megatron.model.build import build_bam_model
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    with cpu_runtime_scope():
        init_distributed(seed=5)
        cfg, bam = kind_configs("BAM KV experts")
        cfg.init_method_std = 0.05
        yield build_bam_model(cfg, bam, vocab_size=4096, max_sequence_length=256, inference=True).eval()
        destroy_distributed()


def reference_loglikelihood(model, tokenizer, context: str, choice: str, max_length: int) -> float:
    """Sum of log p(choice tokens | context) from one forward of this single sequence."""
    ctx = tokenizer.tokenize(context)
    cont = tokenizer.tokenize(context + choice)[len(ctx):]
    seq = (ctx + cont)[-(max_length + 1):]
    inp = seq[:-1]
    with torch.no_grad():
        logits = model(torch.tensor([inp]), torch.arange(len(inp)).unsqueeze(0), None)[0]
    logp = torch.log_softmax(logits.float(), -1)
    return sum(logp[len(inp) - len(cont) + i, t].item() for i, t in enumerate(cont))


@pytest.mark.parametrize("num_fewshot,max_length", [(0, 256), (2, 64)], ids=["zero-shot", "2-shot-truncated"])
def test_scores_equal_the_models_own_logprobs(bam_model, tokenizer, num_fewshot, max_length):
    items = load_task(TASK)[:6]
    result = score_task(bam_model, items, tokenizer.tokenize, tokenizer.eod, max_length=max_length,
                        num_fewshot=num_fewshot, batch_size=5)
    ref = [
        [reference_loglikelihood(bam_model, tokenizer, fewshot_prefix(items, i, num_fewshot) + item.context, c, max_length)
         for c in item.choices]
        for i, item in enumerate(items)
    ]
    np.testing.assert_allclose(np.array(result["loglikelihoods"]), np.array(ref), rtol=1e-5, atol=1e-4)
    acc = np.mean([np.argmax(r) == it.gold for r, it in zip(ref, items)])
    acc_norm = np.mean([np.argmax(np.array(r) / [len(c) for c in it.choices]) == it.gold for r, it in zip(ref, items)])
    assert result["acc"] == pytest.approx(acc) and result["acc_norm"] == pytest.approx(acc_norm)
    assert result["n"] == 6


def test_encode_pair_moves_trailing_whitespace(tokenizer):
    ctx, cont = encode_pair(tokenizer.tokenize, "x = 1 ", "+ 2", tokenizer.eod)
    assert ctx == tokenizer.tokenize("x = 1")
    assert ctx + cont == tokenizer.tokenize("x = 1 + 2")
    assert encode_pair(tokenizer.tokenize, "", "abc", tokenizer.eod) == ([tokenizer.eod], tokenizer.tokenize("abc"))


def test_metrics():
    items = [MCItem("a", "c", [" x", " yyyy"], 1), MCItem("b", "c", [" x", " y"], 0), MCItem("c", "c", [" é", " e"], 0)]
    lls = [[-2.0, -4.0], [-1.0, -1.0], [-2.0, -1.5]]
    m = mc_metrics(items, lls)
    # acc: argmax -> 0, 0 (tie: first), 1 => right on item 2 only
    assert m["acc"] == pytest.approx(1 / 3)
    # acc_norm: -2/2 < -4/5 -> 1 (right); tie -> 0 (right); -2/2 < -1.5/2 -> 1 (wrong)
    assert m["acc_norm"] == pytest.approx(2 / 3)
    # acc_bytes: " é" has 3 bytes: -2/3 > -1.5/2 -> 0 (right)
    assert m["acc_bytes"] == pytest.approx(1.0)
    assert m["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))


def test_fewshot_prefix_is_deterministic_and_excludes_the_item():
    items = [MCItem(str(i), f"q{i}:", [" a", " b"], i % 2) for i in range(6)]
    p = fewshot_prefix(items, 3, 2, seed=7)
    assert p == fewshot_prefix(items, 3, 2, seed=7) and "q3:" not in p
    assert p.count("\n\n") == 2 and fewshot_prefix(items, 3, 0) == ""
    with pytest.raises(InferenceError, match="--num-fewshot 6"):
        fewshot_prefix(items, 0, 6)


def test_task_file_errors(tmp_path):
    bad = tmp_path / "t.jsonl"
    for line, msg in [('{"context": "a", "choices": ["x"], "gold": 0}', "at least two"),
                      ('{"context": "a", "choices": ["x", "y"], "gold": 2}', "gold"),
                      ('{"choices": ["x", "y"], "gold": 0}', "context"), ("nope", "not JSON")]:
        bad.write_text(line + "\n")
        with pytest.raises(InferenceError, match=msg):
            load_task(str(bad))
    with pytest.raises(InferenceError, match="does not exist"):
        load_task(str(tmp_path / "missing.jsonl"))


def test_bundled_tasks_rebuild_identically(tmp_path):
    from bam_megatron.sample_data.tasks import DOMAINS, build_tasks

    build_tasks(f"{REPO_ROOT}/data", str(tmp_path))
    for domain in DOMAINS:
        assert (tmp_path / f"{domain}.jsonl").read_bytes() == open(f"{REPO_ROOT}/data/tasks/{domain}.jsonl", "rb").read()
        items = [json.loads(line) for line in open(tmp_path / f"{domain}.jsonl")]
        assert len(items) == 50 and all(len(it["choices"]) == 4 for it in items)
        golds = [it["gold"] for it in items]
        assert len(set(golds)) == 4  # the right answer is not always in one place
