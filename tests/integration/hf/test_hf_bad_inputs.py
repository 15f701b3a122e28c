"""Bad input to the Hugging Face tools: one line naming the problem, exit status 1, nothing
written (no output, no temporary folder); a failure while writing leaves nothing either, and
an output being replaced with --force stays intact."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.hf import make_hf_model
from support.hf_cases import build_and_save

from bam_megatron.cli import hf_export as export_cli
from bam_megatron.cli import hf_import as import_cli


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)


def _edit_weights(folder, add=None, drop=None):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors.update(add or {})
    for name in drop or []:
        tensors.pop(name)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bad") / "llama")
    make_hf_model(folder, "LlamaConfig")
    return folder


def _variant(llama, tmp_path, config=None, add=None, drop=None, cls=None, **overrides):
    folder = str(tmp_path / "input")
    if cls:
        make_hf_model(folder, cls, **overrides)
    else:
        shutil.copytree(llama, folder)
    if config:
        _edit_config(folder, **config)
    if add or drop:
        _edit_weights(folder, add, drop)
    return folder


def _assert_one_line_nothing_written(run, capsys, tmp_path, output, *needles):
    capsys.readouterr()  # what building the input printed
    rc = run()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 1, err
    assert len(lines) == 1 and lines[0].split(": error: ")[0] in ("hf_import.py", "hf_export.py"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not os.path.exists(output)
    assert not [p for p in os.listdir(os.path.dirname(output)) if ".tmp-" in p]


ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
IMPORT_CASES = {
    # name: (variant kwargs, extra CLI flags, words the message must hold)
    "unknown architecture": (dict(config={"architectures": ["GPT2LMHeadModel"]}), [], ["architectures", "GPT2LMHeadModel"]),
    "RoPE scaling (transformers 5)": (dict(config={"rope_parameters": ROPE_LLAMA3}), [], ["rope_parameters.rope_type", "llama3"]),
    "RoPE scaling (transformers 4)": (dict(config={"rope_parameters": None, "rope_theta": 10000.0,
                                                   "rope_scaling": {"type": "linear", "factor": 2.0}}), [], ["rope_scaling"]),
    "non-integer RoPE base": (dict(config={"rope_parameters": {"rope_type": "default", "rope_theta": 10000.5}}), [], ["rope_theta"]),
    "partial RoPE": (dict(config={"partial_rotary_factor": 0.5}), [], ["partial_rotary_factor"]),
    "sliding window (Mistral)": (dict(cls="MistralConfig", sliding_window=16), ["--seq-length", "64"], ["sliding_window", "--seq-length 16"]),
    "sliding window (Qwen2)": (dict(cls="Qwen2Config", use_sliding_window=True, sliding_window=8, max_window_layers=0), [], ["sliding_window"]),
    "attention bias without MLP bias": (dict(cls="LlamaConfig", attention_bias=True), [], ["attention_bias"]),
    "Qwen3 attention bias": (dict(cls="Qwen3Config", attention_bias=True), [], ["attention_bias"]),
    "Cohere QK norm": (dict(cls="CohereConfig", use_qk_norm=True), [], ["use_qk_norm"]),
    "GELU FFN": (dict(config={"hidden_act": "gelu"}), [], ["hidden_act"]),
    "a bias the config does not have": (dict(add={"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}), [],
                                        ["model.layers.0.self_attn.o_proj.bias", "does not describe"]),
    "a missing tensor": (dict(drop=["model.layers.1.self_attn.k_proj.weight"]), [], ["model.layers.1.self_attn.k_proj.weight"]),
    "a tensor of the wrong shape": (dict(config={"intermediate_size": 128}), [], ["the weights do not match the config"]),
}


@pytest.mark.parametrize("name", list(IMPORT_CASES))
def test_import_refuses_in_one_line(llama, tmp_path, capsys, name):
    variant, flags, needles = IMPORT_CASES[name]
    folder = _variant(llama, tmp_path, **variant)
    output = str(tmp_path / "out" / "ckpt")
    os.makedirs(os.path.dirname(output))
    _assert_one_line_nothing_written(lambda: import_cli.main([folder, "-o", output, *flags]), capsys, tmp_path, output, *needles)


def test_import_refuses_folders_without_config_or_safetensors(llama, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    output = str(tmp_path / "ckpt")
    _assert_one_line_nothing_written(lambda: import_cli.main([str(empty), "-o", output]), capsys, tmp_path, output, "no config.json")
    binary = tmp_path / "bin"
    shutil.copytree(llama, binary)
    os.remove(binary / "model.safetensors")
    torch.save({}, binary / "pytorch_model.bin")
    _assert_one_line_nothing_written(lambda: import_cli.main([str(binary), "-o", output]), capsys, tmp_path, output,
                                     "no *.safetensors", "pytorch_model.bin")


def test_existing_output_needs_force_and_a_failed_run_keeps_it(llama, tmp_path, capsys, monkeypatch):
    output = tmp_path / "ckpt"
    output.mkdir()
    (output / "keep.txt").write_text("previous")
    assert import_cli.main([llama, "-o", str(output)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err and (output / "keep.txt").exists()

    from bam_megatron.hf.safetensors_io import SafetensorsFolder

    original = SafetensorsFolder.read

    def fail_in_layer_1(self, name, dtype=None):
        if name.startswith("model.layers.1."):
            raise OSError("disk full (simulated)")
        return original(self, name, dtype)

    monkeypatch.setattr(SafetensorsFolder, "read", fail_in_layer_1)
    with pytest.raises(OSError, match="simulated"):
        import_cli.main([llama, "-o", str(output), "--force", "-q"])
    assert (output / "keep.txt").read_text() == "previous"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    monkeypatch.setattr(SafetensorsFolder, "read", original)
    assert import_cli.main([llama, "-o", str(output), "--force", "-q"]) == 0
    assert not (output / "keep.txt").exists() and (output / "latest_checkpointed_iteration.txt").exists()


@pytest.fixture(scope="module")
def bam_ckpt(tmp_path_factory):
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    root = str(tmp_path_factory.mktemp("bad_export") / "bam")
    init_distributed(seed=1)
    try:
        build_and_save("bam-kv-experts", root)
    finally:
        destroy_distributed()
    return root


def test_export_refuses_in_one_line(bam_ckpt, tmp_path, capsys):
    output = str(tmp_path / "hf")
    not_a_ckpt = tmp_path / "nothing"
    not_a_ckpt.mkdir()
    run = export_cli.main
    _assert_one_line_nothing_written(lambda: run([str(not_a_ckpt), "-o", output]), capsys, tmp_path, output, "not a torch_dist checkpoint")
    _assert_one_line_nothing_written(lambda: run([bam_ckpt, "-o", output, "--architecture", "mixtral"]), capsys, tmp_path, output,
                                     "MixtralForCausalLM cannot hold this model exactly")
    _assert_one_line_nothing_written(lambda: run([bam_ckpt, "-o", output, "--tokenizer", str(tmp_path / "missing.json")]),
                                     capsys, tmp_path, output, "--tokenizer", "does not exist")
    _assert_one_line_nothing_written(lambda: run([bam_ckpt, "-o", os.path.join(bam_ckpt, "hf")]), capsys, tmp_path,
                                     os.path.join(bam_ckpt, "hf"), "overlaps")
    no_args = tmp_path / "no_args"
    shutil.copytree(bam_ckpt, no_args)
    torch.save({"iteration": 0}, no_args / "iter_0000000" / "common.pt")
    _assert_one_line_nothing_written(lambda: run([str(no_args), "-o", output]), capsys, tmp_path, output, "records no model arguments")
    lost_tokenizer = tmp_path / "lost_tokenizer"
    shutil.copytree(bam_ckpt, lost_tokenizer)
    common = torch.load(lost_tokenizer / "iter_0000000" / "common.pt", weights_only=False)
    common["args"].update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="tokenizer/tokenizer.json")
    torch.save(common, lost_tokenizer / "iter_0000000" / "common.pt")
    _assert_one_line_nothing_written(lambda: run([str(lost_tokenizer), "-o", output]), capsys, tmp_path, output,
                                     "tokenizer/tokenizer.json", "--no-tokenizer")


def test_a_failed_export_writes_nothing(bam_ckpt, tmp_path, monkeypatch):
    from bam_megatron.hf import safetensors_io

    calls = {"n": 0}
    original = safetensors_io.SafetensorsWriter.write

    def fail_later(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk full (simulated)")
        return original(self, name, tensor)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", fail_later)
    with pytest.raises(OSError, match="simulated"):
        export_cli.main([bam_ckpt, "-o", str(tmp_path / "hf"), "-q"])
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_one_line(bam_ckpt, tmp_path, capsys, monkeypatch):
    import errno

    from bam_megatron.hf import safetensors_io

    def no_space(self, shard, offset, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "_write_bytes", no_space)
    output = str(tmp_path / "hf")
    _assert_one_line_nothing_written(lambda: export_cli.main([bam_ckpt, "-o", output, "-q"]), capsys, tmp_path, output,
                                     "no space left on device", "nothing was written")
