"""Time and memory of tools/hf_import.py and tools/hf_export.py against copying the same bytes.

    python bench/bench_hf.py                         # a ~1.2 GB bf16 Llama-shaped model
    python bench/bench_hf.py --num-layers 16 --workdir /scratch/bench --keep

Writes a random Hugging Face ``LlamaForCausalLM`` folder (safetensors shards of
``--shard-size-mb``, ``config.json``, a word-level ``tokenizer.json``) without building the model
in memory, then measures, ``--repeat`` times each, interleaved, each after a ``sync``:

- ``cp -r`` of the Hugging Face folder + ``sync`` vs ``tools/hf_import.py`` (fsync on) into a
  checkpoint, and
- ``cp -r`` of that checkpoint + ``sync`` vs ``tools/hf_export.py`` back to a Hugging Face folder,

each tool as a child process: wall time (Python start-up and imports included; the time the tool
reports for the conversion itself is shown too) and peak resident memory (``ru_maxrss`` from ``wait4`` and ``VmHWM`` sampled every 20 ms). Prints the
medians as a table (and one JSON line). Everything it wrote is deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_upcycle import GIB, du, run_with_rusage  # beside this script (the script's folder is on the path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=10)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=5632)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--num-key-value-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--shard-size-mb", type=float, default=300)
    p.add_argument("--workdir", default=None, help="where the models go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep everything written")
    p.add_argument("--repeat", type=int, default=3, help="runs of every measurement (the median is reported)")
    p.add_argument("--make-hf-folder", default=None, metavar="DIR", help=argparse.SUPPRESS)  # the model, in its own process
    return p.parse_args(argv)


def make_hf_folder(path: str, args) -> None:
    """A random bf16 Llama folder, one tensor in memory at a time."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bam_megatron.hf.safetensors_io import PlannedEntry, SafetensorsWriter

    L, d, f, h, g, v = (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads,
                        args.num_key_value_heads, args.vocab_size)
    dh = d // h
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (h * dh, d), p + "self_attn.k_proj.weight": (g * dh, d),
                       p + "self_attn.v_proj.weight": (g * dh, d), p + "self_attn.o_proj.weight": (d, h * dh),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)})
    shapes.update({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
    os.makedirs(path)
    writer = SafetensorsWriter(path, [PlannedEntry(n, s, torch.bfloat16) for n, s in shapes.items()],
                               int(args.shard_size_mb * 1024**2), sync=False)
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        writer.write(name, t.to(torch.bfloat16))
    writer.close()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": v, "hidden_size": d,
              "intermediate_size": f, "num_hidden_layers": L, "num_attention_heads": h, "num_key_value_heads": g,
              "head_dim": dh, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(v)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "w1"}, fh)


def _tool_seconds(summary: str) -> float:
    """The seconds a tool reports for its own work (``read X GiB, wrote Y GiB, Z s``): the wall
    time without Python's start-up and imports."""
    line = next(x for x in summary.splitlines() if x.strip().startswith("read ") and ", wrote " in x)
    return float(line.rsplit(",", 1)[1].split()[0])


def _tool(name: str, src: str, out: str) -> list:
    return [sys.executable, os.path.join(ROOT, "tools", f"{name}.py"), src, "-o", out]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_hf_folder:
        make_hf_folder(args.make_hf_folder, args)
        return 0
    work = args.workdir or tempfile.mkdtemp(prefix="bench_hf_")
    os.makedirs(work, exist_ok=True)
    hf, ckpt, back, copy = (os.path.join(work, n) for n in ("hf", "ckpt", "hf_back", "copy"))
    results = {"shape": {k: getattr(args, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                                        "num_key_value_heads", "vocab_size", "shard_size_mb")}}
    try:
        if not os.path.isdir(hf):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                            "--make-hf-folder", hf], check=True)
            print(f"wrote {hf} in {time.perf_counter() - t0:.1f} s", flush=True)
        runs = {k: [] for k in ("cp hf", "import", "cp ckpt", "export", "import (in the tool)", "export (in the tool)")}
        peaks = {"import": [], "export": []}
        for _ in range(args.repeat):
            for label, cmd, out in (("cp hf", None, hf), ("import", _tool("hf_import", hf, ckpt), ckpt),
                                    ("cp ckpt", None, ckpt), ("export", _tool("hf_export", ckpt, back), back)):
                subprocess.run(["sync"], check=True)
                if cmd is None:
                    r = run_with_rusage(["bash", "-c", f"cp -r {out} {copy} && sync"])
                    shutil.rmtree(copy)
                else:
                    if os.path.exists(out):
                        shutil.rmtree(out)
                    r = run_with_rusage(cmd)
                    peaks[label].append(max(r["max_rss"], r["vm_hwm"]))
                    runs[f"{label} (in the tool)"].append(_tool_seconds(r["stdout"]))
                    results[f"{label}_summary"], results[f"{label}_progress"] = r["stdout"], r["stderr"]
                runs[label].append(r["seconds"])
        results["bytes"] = {"hf": du(hf), "ckpt": du(ckpt), "hf_back": du(back)}
        base = run_with_rusage([sys.executable, "-c", "import bam_megatron.hf.importer, bam_megatron.hf.exporter"])
        results.update(seconds=runs, peak_rss=peaks, imports_seconds=base["seconds"], imports_max_rss=base["max_rss"])
        _report(results, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _report(results: dict, repeat: int) -> None:
    runs = results["seconds"]
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: min(v) for k, v in runs.items()}
    size = results["bytes"]

    def t(k, ref=None):
        text = f"{med[k]:.1f} s (best {best[k]:.1f} s)"
        return text + (f" = {med[k] / med[ref]:.1f} x cp" if ref else "")

    rows = [
        ("Hugging Face folder (bf16)", f"{size['hf'] / GIB:.2f} GiB", ""),
        ("python + imports of the tools", f"{results['imports_seconds']:.1f} s", f"RSS {results['imports_max_rss'] / GIB:.2f} GiB"),
        ("cp -r folder + sync", t("cp hf"), ""),
        ("hf_import.py (fsync)", t("import", "cp hf"), f"peak RSS {max(results['peak_rss']['import']) / GIB:.2f} GiB"),
        ("  of which the conversion itself", t("import (in the tool)", "cp hf"), ""),
        (f"cp -r checkpoint ({size['ckpt'] / GIB:.2f} GiB) + sync", t("cp ckpt"), ""),
        ("hf_export.py, LlamaForCausalLM (fsync)", t("export", "cp ckpt"),
         f"peak RSS {max(results['peak_rss']['export']) / GIB:.2f} GiB"),
        ("  of which the conversion itself", t("export (in the tool)", "cp ckpt"), ""),
    ]
    for key in ("import_progress", "import_summary", "export_progress", "export_summary"):
        print(results.pop(key))
    print(f"median of {repeat} runs each (all runs: {json.dumps({k: [round(x, 1) for x in v] for k, v in runs.items()})})")
    print("| what | time / size | memory |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
