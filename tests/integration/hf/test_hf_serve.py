"""tools/serve.py serves an exported BAM model behind transformers' OpenAI-compatible server: on
127.0.0.1, the ``openai`` client's greedy ``/v1/completions`` text is ``tools/generate.py``'s for
the same checkpoint, ``/v1/chat/completions`` applies the chat template carried from the
checkpoint's tokenizer, and the server stops on SIGTERM; a folder without a tokenizer is one line."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from support import REPO_ROOT
from support.hf_cases import build_and_save, load_export
from support.training import free_port, subprocess_env

from bam_megatron.cli import generate as generate_program
from bam_megatron.cli import serve as serve_program
from bam_megatron.hf.exporter import ExportOptions, hf_export
from bam_megatron.parallel.lifetime import die_with_parent

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
PROMPT, NEW = "t1 t2 t3", 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Nexus BAM checkpoint (shared expert, 4 attention experts) with a word-level tokenizer
    whose ``tokenizer_config.json`` holds a chat template, and its export."""
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    root = tmp_path_factory.mktemp("serve")
    init_distributed(seed=1)
    try:
        build_and_save("nexus-bam", str(root / "ckpt"), tokenizer=True)
    finally:
        destroy_distributed()
    config = root / "ckpt" / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": TEMPLATE}))
    hf_export(str(root / "ckpt"), str(root / "hf"), ExportOptions())
    return root


def _wait_healthy(proc: subprocess.Popen, port: int, deadline_s: float = 180.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if json.load(response).get("status") == "ok":
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the server did not answer /health within {deadline_s} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_served_completion_is_generate_py_text_and_chat_uses_the_template(exported, capsys):
    from openai import OpenAI

    assert generate_program.main(["--load", str(exported / "ckpt"), "--prompt", PROMPT, "--max-new-tokens", str(NEW),
                                  "--greedy", "--output-format", "json", "-q"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(expected["generated_ids"]) == NEW  # no early end of document: both sides make NEW tokens

    folder, port = str(exported / "hf"), free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "tools", "serve.py"), folder, "--port", str(port),
                             "--device", "cpu"], cwd=str(exported), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent)
    try:
        _wait_healthy(proc, port)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        assert [m.id for m in client.models.list().data] == [folder]
        completion = client.completions.create(model=folder, prompt=PROMPT, max_tokens=NEW, temperature=0)
        assert completion.choices[0].text == expected["generated_text"]
        assert completion.usage.prompt_tokens == 3 and completion.usage.completion_tokens == NEW

        messages = [{"role": "user", "content": "t4 t5"}]
        chat = client.chat.completions.create(model=folder, messages=messages, max_tokens=6, temperature=0)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        assert tok.decode(prompt["input_ids"][0]) == "t4 t5"  # the template, carried into the export
        out = load_export(folder).generate(**prompt, max_new_tokens=6, do_sample=False)
        assert chat.choices[0].message.content == tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        _stop(proc)
    assert proc.returncode is not None and "Shutting down" in proc.stdout.read()


def test_a_folder_without_tokenizer_or_config_is_one_line(exported, tmp_path, capsys):
    bare = tmp_path / "bare"
    hf_export(str(exported / "ckpt"), str(bare), ExportOptions(no_tokenizer=True))
    assert serve_program.main([str(bare)]) == 1
    assert capsys.readouterr().err == (f"serve.py: error: {bare} has no tokenizer files; export it with its tokenizer "
                                       "(hf_export.py without --no-tokenizer, or --tokenizer PATH)\n")
    assert serve_program.main([str(tmp_path)]) == 1
    assert "has no config.json" in capsys.readouterr().err
