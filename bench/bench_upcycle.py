"""Time and memory of the Mix phase tool against copying the seeds.

    python bench/bench_upcycle.py                       # 4 seeds of ~1.1 GB (bf16), mode full
    python bench/bench_upcycle.py --mode shared-kv --workdir /scratch/bench --keep

Writes ``--num-seeds`` random dense checkpoints with megatron-core's ``dist_checkpointing.save``
(GPT key names, Megatron-LM layout, recorded arguments), then measures

- ``cp -r`` of the seed directories, and ``cp -r`` + ``sync``, and
- ``tools/upcycle_bam.py`` on them, as a child process: wall time (Python start-up included)
  and its peak resident memory (``ru_maxrss`` from ``wait4`` and ``VmHWM`` sampled every 20 ms),
  with fsync (the default; compared with ``cp -r`` + ``sync``) and with ``--no-fsync``
  (compared with ``cp -r``),

``--repeat`` times each, interleaved, each after a ``sync``; prints the medians as a table
(and one JSON line with every run). Everything it wrote is deleted at the end unless
``--keep``. The page cache is not dropped: all runs read warm seeds.
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

from bam_megatron.checkpoint.layout import TRACKER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GIB = 1024**3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-seeds", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=5632)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--mode", choices=["full", "shared-kv", "merged"], default="full")
    p.add_argument("--seed-layout", choices=["per-layer", "whole"], default="per-layer",
                   help="per-layer: chunks as a model saves them (default); whole: one chunk per tensor")
    p.add_argument("--part-size-mb", type=float, default=None, help="passed to the tool (default: its own)")
    p.add_argument("--workdir", default=None, help="where seeds and outputs go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the seeds and the output")
    p.add_argument("--skip-nofsync", action="store_true", help="only the default (fsync) conversion")
    p.add_argument("--repeat", type=int, default=3, help="runs of every measurement (the median is reported)")
    p.add_argument("--make-seed", nargs=2, metavar=("PATH", "INDEX"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def du(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def make_seed(path: str, args, index: int) -> None:
    """A dense GPT checkpoint with random weights, written by megatron-core's
    ``dist_checkpointing.save`` in the layout a model writes: every decoder layer its own chunk
    of the ``[L, ...]`` tensors, SwiGLU ``linear_fc1`` as two chunks ([gate; up]) per layer
    (``--seed-layout per-layer``), or every tensor one chunk (``whole``, as
    ``save_global_tensors`` writes)."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(1000 + index)
    L, d, f, h, v = args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads, args.vocab_size

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    tensors = {
        "embedding.word_embeddings.weight": rnd(v, d),
        "decoder.layers.input_layernorm.weight": torch.ones(L, d, dtype=dtype),
        "decoder.layers.self_attention.linear_qkv.weight": rnd(L, 3 * d, d),
        "decoder.layers.self_attention.linear_proj.weight": rnd(L, d, d),
        "decoder.layers.mlp.linear_fc1.weight": rnd(L, 2 * f, d),
        "decoder.layers.mlp.linear_fc2.weight": rnd(L, d, f),
        "decoder.final_layernorm.weight": torch.ones(d, dtype=dtype),
        "output_layer.weight": rnd(v, d),
    }
    sharded = {}
    for key, t in tensors.items():
        if args.seed_layout == "whole" or not key.startswith("decoder.layers."):
            sharded[key] = ShardedTensor.from_rank_offsets(key, t, replica_id=0)
            continue
        for layer in range(L):
            if key.endswith("linear_fc1.weight"):
                for half in range(2):
                    piece = t[layer : layer + 1, half * f : (half + 1) * f]
                    sharded[f"{key}.{layer}.{half}"] = ShardedTensor.from_rank_offsets(key, piece, (0, layer, L), (1, half, 2), replica_id=0)
            else:
                sharded[f"{key}.{layer}"] = ShardedTensor.from_rank_offsets(key, t[layer : layer + 1], (0, layer, L), replica_id=0)
    ckpt = os.path.join(path, "iter_0001000")
    os.makedirs(ckpt)
    init_distributed(seed=index)  # one process (gloo; the CPU runtime when there is no GPU)
    try:
        dist_checkpointing.save(sharded, ckpt)
    finally:
        destroy_distributed()
    del tensors, sharded
    model_args = dict(
        num_layers=L, hidden_size=d, ffn_hidden_size=f, num_attention_heads=h, num_query_groups=h,
        kv_channels=d // h, seq_length=2048, max_position_embeddings=2048, swiglu=True,
        normalization="RMSNorm", norm_epsilon=1e-5, position_embedding_type="rope", rotary_base=10000,
        rotary_percent=1.0, untie_embeddings_and_output_weights=True, add_bias_linear=False,
        padded_vocab_size=v, init_method_std=0.02, tokenizer_type="NullTokenizer", vocab_size=v - 1,
        bam_sequential_block=False,
    )
    torch.save({"args": model_args, "iteration": 1000}, os.path.join(ckpt, "common.pt"))
    with open(os.path.join(path, TRACKER), "w") as fh:
        fh.write("1000")


def _vm_hwm(pid: int) -> int:
    """Peak resident memory of a live process (``VmHWM``), bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_with_rusage(cmd) -> dict:
    """Run ``cmd``: wall seconds and the peak resident memory of that child, twice measured:
    ``ru_maxrss`` from ``wait4`` and the last ``VmHWM`` sampled every 20 ms."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        hwm = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm = max(hwm, _vm_hwm(proc.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{stderr[-3000:]}")
    return {"seconds": wall, "max_rss": usage.ru_maxrss * 1024, "vm_hwm": hwm, "stdout": stdout, "stderr": stderr}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_seed:
        make_seed(args.make_seed[0], args, int(args.make_seed[1]))
        return 0
    work = args.workdir or tempfile.mkdtemp(prefix="bench_upcycle_")
    os.makedirs(work, exist_ok=True)
    seeds = [os.path.join(work, f"seed{i}") for i in range(args.num_seeds)]
    results = {"shape": {k: getattr(args, k) for k in ("num_seeds", "num_layers", "hidden_size", "ffn_hidden_size",
                                                        "num_attention_heads", "vocab_size", "dtype", "mode", "seed_layout")}}
    try:
        t0 = time.perf_counter()
        for i, s in enumerate(seeds):
            if not os.path.isdir(s):  # in a child process, so that this one stays small
                shape = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size", "dtype", "seed_layout")]
                subprocess.run([sys.executable, os.path.abspath(__file__), *shape, "--make-seed", s, str(i)], check=True)
        results["seed_bytes"] = du(seeds[0])
        results["seeds_bytes"] = sum(du(s) for s in seeds)
        print(f"seeds: {args.num_seeds} x {results['seed_bytes'] / GIB:.2f} GiB ({time.perf_counter() - t0:.1f} s to write)", flush=True)

        copy_dir = os.path.join(work, "copy")
        base = run_with_rusage([sys.executable, "-c", "import bam_megatron.upcycle.mix"])
        results["import_seconds"] = base["seconds"]
        results["import_max_rss"] = base["max_rss"]

        variants = [("fsync", [])] + ([] if args.skip_nofsync else [("no-fsync", ["--no-fsync"])])
        runs = {"cp": [], "cp+sync": [], **{name: [] for name, _ in variants}}
        peaks = {name: [] for name, _ in variants}
        for _rep in range(args.repeat):  # interleaved, each after a sync, so that no run pays for another's writeback
            for label, tail in (("cp", ""), ("cp+sync", " && sync")):
                subprocess.run(["sync"], check=True)
                r = run_with_rusage(["bash", "-c", f"mkdir {copy_dir} && cp -r {' '.join(seeds)} {copy_dir}/{tail}"])
                runs[label].append(r["seconds"])
                shutil.rmtree(copy_dir)
            for name, flags in variants:
                out = os.path.join(work, f"bam_{name}")
                cmd = [sys.executable, os.path.join(ROOT, "tools", "upcycle_bam.py"), "-o", out,
                       "--attention-experts", args.mode, *flags, *seeds]
                if args.part_size_mb is not None:
                    cmd += ["--part-size-mb", str(args.part_size_mb)]
                subprocess.run(["sync"], check=True)
                r = run_with_rusage(cmd)
                runs[name].append(r["seconds"])
                peaks[name].append(max(r["max_rss"], r["vm_hwm"]))
                results["output_bytes"] = du(out)
                results["summary"], results["progress"] = r["stdout"], r["stderr"]
                shutil.rmtree(out)
        results["seconds"] = runs
        results["peak_rss"] = peaks
        med = {k: statistics.median(v) for k, v in runs.items()}

        seed_gib = results["seed_bytes"] / GIB
        rows = [
            ("seeds", f"{args.num_seeds} x {seed_gib:.2f} GiB", ""),
            ("output", f"{results['output_bytes'] / GIB:.2f} GiB", ""),
            ("python + imports of the tool", f"{results['import_seconds']:.1f} s", f"RSS {results['import_max_rss'] / GIB:.2f} GiB"),
            ("cp -r seeds", f"{med['cp']:.1f} s", ""),
            ("cp -r seeds + sync", f"{med['cp+sync']:.1f} s", ""),
        ]
        for name, _ in variants:
            ref = "cp+sync" if name == "fsync" else "cp"
            m = max(peaks[name])
            rows.append((f"upcycle_bam.py ({name})", f"{med[name]:.1f} s = {med[name] / med[ref]:.2f} x {ref}",
                         f"peak RSS {m / GIB:.2f} GiB = {m / results['seed_bytes']:.2f} x one seed"))
        print()
        print(results.pop("progress"))
        print(results.pop("summary"))
        print(f"median of {args.repeat} runs each (all runs: {json.dumps({k: [round(x, 1) for x in v] for k, v in runs.items()})})")
        print("| what | time / size | memory |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
        print(json.dumps(results))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
