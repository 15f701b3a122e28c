"""tools/generate.py end to end on a trained BAM checkpoint: JSON output, text prompts through the
checkpoint's tokenizer, the one-line errors for a prompt longer than the context and for words
given to a NullTokenizer checkpoint, and the same
greedy tokens under torchrun at EP2 (each rank its own prompts) as in one process."""

import json
import subprocess
import sys

import pytest
from support import REPO_ROOT
from support.training import free_port, subprocess_env

from bam_megatron.cli import generate as program

PROMPTS = ["--prompt-token-ids", "1,2,3", "--prompt-token-ids", "40,41,42,43,44", "--prompt", "7 8 9",
           "--prompt-token-ids", "100", "--max-new-tokens", "5", "--greedy", "--output-format", "json"]


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_json_output(good, capsys):
    rc = program.main(["--load", good["root"], "--batch-size", "3", *PROMPTS])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = _json_lines(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    # --prompt first, then --prompt-token-ids, in the order given
    assert rows[0]["prompt_ids"] == [7, 8, 9] and rows[1]["prompt_ids"] == [1, 2, 3]
    for r in rows:
        assert len(r["generated_ids"]) == len(r["logprobs"]) <= 5
        assert all(lp <= 0 for lp in r["logprobs"])
        assert r["generated_text"] == " ".join(str(t) for t in r["generated_ids"])  # NullTokenizer
    assert "[generate] loaded" in err and "BAM KV experts" in err


def test_text_output_and_prompt_file(good, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "3 4 5"}\n{"prompt_ids": [9, 10]}\n')
    rc = program.main(["--load", good["root"], "--prompts-file", str(prompts), "--max-new-tokens", "3", "--top-k", "5", "-q"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.count("=== prompt") == 2 and out.splitlines()[1].startswith("3 4 5")
    assert err == ""


def test_prompt_longer_than_the_context_is_one_line(good, capsys):
    rc = program.main(["--load", good["root"], "--prompt-token-ids", ",".join(["1"] * 40), "--output-format", "json"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err == ("generate.py: error: prompt 0 has 40 tokens but the model's context is 32 tokens; "
                   "shorten it to at most 31 tokens\n")


def test_a_word_for_a_null_tokenizer_is_one_line(good, capsys):
    """The checkpoint's NullTokenizer reads ids; a word is a one-line error, not a traceback."""
    rc = program.main(["--load", good["root"], "--prompt", "hello"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and "Traceback" not in err
    assert err == ("generate.py: error: prompt 'hello' cannot be tokenized: the NullTokenizer reads text as "
                   "space-separated token ids 0..127, and 'hello' is not a number; give the ids with "
                   "--prompt-token-ids 1,2,3 (or a checkpoint with a text tokenizer, or --tokenizer-type / "
                   "--tokenizer-model)\n")


def test_torchrun_ep2_matches_one_process(good, capsys):
    assert program.main(["--load", good["root"], "-q", *PROMPTS]) == 0
    single = _json_lines(capsys.readouterr().out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "tools/generate.py", "--load", good["root"], "--expert-model-parallel-size", "2",
           "--batch-size", "1", *PROMPTS]
    run = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = _json_lines(run.stdout)  # printed once, by rank 0
    assert [r["generated_ids"] for r in rows] == [r["generated_ids"] for r in single]
    for got, ref in zip(rows, single):
        assert got["logprobs"] == pytest.approx(ref["logprobs"], abs=1e-4)
