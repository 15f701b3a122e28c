"""Checkpoint saves and loads against the disk's limit, on CPU.

    python bench/bench_checkpoint.py [--repeats 3] [--dir /scratch] [--layers 6] [--hidden 1024]

Trains a dense model whose checkpoint (fp32 weights + Adam's two moments) is at least 1 GiB with
``pretrain_bam.py`` (mock data, 32-token sequences: the steps are short, the state is large) at 1
rank and at 2 data-parallel ranks (``tools/torchrun.py``; fully parallel save and load, the
defaults), and reads what the programs print:

- synchronous save: ``[checkpoint] saved ... (size in T s)`` (write, fsync, checksums, publish);
- ``--async-save``: the training stall (hand-over + publish, and any wait for a write that had not
  finished), the background completion (write + fsync + checksums in the helper processes) and
  the time of the training steps that ran while a helper wrote, against the others;
- load: ``[checkpoint] loaded ... (T s)`` when resuming (weights + optimizer + RNG; the checksum
  verification before it is timed on its own, in this process);

each against writing and fsyncing the same number of bytes with plain file I/O (one writer per
rank, started together: the disk's limit) and, for the load, reading the checkpoint's files.
Every figure is the median over ``--repeats`` rounds (the saves after each run's first, which
also starts the helper processes; three plain writes per round, whose spread shows how steady
the disk is); the machine's load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "pretrain_bam.py")
TORCHRUN = os.path.join(ROOT, "tools", "torchrun.py")

SYNC = re.compile(r"\[checkpoint\] saved (\S+) \([\d.]+ \w+ in ([\d.]+) s\)")
HANDED = re.compile(r"\[checkpoint\] saving (\S+) in the background")
BACKGROUND = re.compile(
    r"\[checkpoint\] saved (\S+) \([\d.]+ \w+; in the background ([\d.]+) s: written ([\d.]+) s, checksummed "
    r"([\d.]+) s; training paused ([\d.]+) s to hand over, ([\d.]+) s to publish(?:, ([\d.]+) s waiting for it)?\)")
LOADED = re.compile(r"\[checkpoint\] loaded (\S+) at iteration \d+: .*\(([\d.]+) s\)\s*$", re.M)
STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+)")


def model_args(layers: int, hidden: int) -> list:
    return ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(hidden // 128),
            "--ffn-hidden-size", str(4 * hidden), "--swiglu", "--normalization", "RMSNorm",
            "--position-embedding-type", "rope", "--disable-bias-linear", "--seq-length", "32",
            "--vocab-size", "128", "--micro-batch-size", "1", "--lr", "1e-4", "--min-lr", "1e-5",
            "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "100000", "--mock-data"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list, ranks: int) -> str:
    """``pretrain_bam.py argv`` at ``ranks`` ranks; its output (stops on failure)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)), WANDB_MODE="offline")
    launcher = [SCRIPT] if ranks == 1 else [TORCHRUN, "--nproc-per-node", str(ranks), "--master-addr",
                                            "127.0.0.1", "--master-port", str(_port()), SCRIPT]
    proc = subprocess.run([sys.executable, *launcher, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_checkpoint.py: error: a run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, files in os.walk(path) for n in files)


def plain_write(folder: str, total: int, writers: int) -> float:
    """Seconds to write and fsync ``total`` bytes split over ``writers`` files written at once
    (threads: the writes and fsyncs release the GIL)."""
    block = os.urandom(16 << 20)

    def one(i: int) -> None:
        left = total // writers
        with open(os.path.join(folder, f"plain_{i}.bin"), "wb") as f:
            while left > 0:
                left -= f.write(memoryview(block)[:min(left, len(block))])
            f.flush()
            os.fsync(f.fileno())

    start = time.monotonic()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(one, range(writers)))
    seconds = time.monotonic() - start
    for i in range(writers):
        os.remove(os.path.join(folder, f"plain_{i}.bin"))
    return seconds


def plain_read(ckpt_dir: str) -> float:
    """Seconds to read every file of ``ckpt_dir`` (as a load does; whatever the page cache holds)."""
    start = time.monotonic()
    for name in os.listdir(ckpt_dir):
        with open(os.path.join(ckpt_dir, name), "rb") as f:
            while f.read(16 << 20):
                pass
    return time.monotonic() - start


def verify_seconds(root: str) -> float:
    """Seconds to open ``root`` and verify every file against its checksums (one process)."""
    from bam_megatron.checkpoint.opener import open_checkpoint

    start = time.monotonic()
    open_checkpoint(root)
    return time.monotonic() - start


def sync_round(work: str, model: list, ranks: int) -> dict:
    root = os.path.join(work, f"sync{ranks}")
    log = run(model + ["--train-iters", "6", "--save-interval", "2", "--save", root], ranks)
    saves = [float(m.group(2)) for m in SYNC.finditer(log)]
    assert len(saves) == 3, log[-2000:]
    return {"root": root, "bytes": directory_bytes(os.path.join(root, "iter_0000006")), "save": saves[1:]}


def async_round(work: str, model: list, ranks: int) -> dict:
    """Saves every 4 iterations in the background (16 iterations: the saves at 8 and 12 count)."""
    root = os.path.join(work, f"async{ranks}")
    log = run(model + ["--train-iters", "16", "--save-interval", "4", "--async-save", "--save", root], ranks)
    done = {m.group(1): m for m in BACKGROUND.finditer(log)}
    out = {"stall": [], "background": [], "waited": [], "busy_steps": [], "quiet_steps": []}
    for it in (8, 12):
        m = done[os.path.join(root, f"iter_{it:07d}")]
        waited = float(m.group(7) or 0.0)
        out["stall"].append(float(m.group(5)) + float(m.group(6)) + waited)
        out["background"].append(float(m.group(2)))
        out["waited"].append(waited)
    writing = False  # whether a helper is writing while the step of the line ran
    for line in log.splitlines():
        if HANDED.search(line):
            writing = True
        elif BACKGROUND.search(line):
            writing = False
        step = STEP.search(line)
        if step and int(step.group(1)) > 1:
            (out["busy_steps"] if writing else out["quiet_steps"]).append(float(step.group(2)) / 1e3)
    return out


def load_round(sync: dict, model: list, ranks: int) -> dict:
    """Resume the synchronous run's last checkpoint (one more step, no save)."""
    log = run(model + ["--train-iters", "7", "--load", sync["root"], "--override-opt-param-scheduler"], ranks)
    found = LOADED.search(log)
    assert found, log[-2000:]
    ckpt = os.path.join(sync["root"], "iter_0000006")
    out = {"load": [float(found.group(2))], "read": [plain_read(ckpt)], "verify": [verify_seconds(sync["root"])],
           "load_each_reads": []}
    if ranks > 1:  # the same load with every rank reading every replicated tensor itself
        log = run(model + ["--train-iters", "7", "--load", sync["root"], "--override-opt-param-scheduler",
                           "--no-ckpt-fully-parallel-load"], ranks)
        out["load_each_reads"].append(float(LOADED.search(log).group(2)))
    return out


def _median(values) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values) -> str:
    return f"{_median(values):.2f} s" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def report(ranks: int, rounds: list) -> None:
    gib = rounds[0]["bytes"] / 2**30
    get = {k: [v for r in rounds for v in r[k]] for k, v in rounds[0].items() if isinstance(v, list)}
    plain, sync = _median(get["plain"]), _median(get["save"])
    stall, quiet, busy = _median(get["stall"]), _median(get["quiet_steps"]), _median(get["busy_steps"])
    rate = lambda s: f"{gib / s:.2f} GiB/s"  # noqa: E731
    what = "1 rank" if ranks == 1 else f"{ranks} data-parallel ranks, fully parallel save and load"
    print(f"\n{what}: checkpoint {gib:.2f} GiB; medians of {len(rounds)} round(s) (min-max)")
    print(f"  plain write + fsync ({ranks} writer(s))  {_spread(get['plain'])} = {rate(plain)}")
    print(f"  synchronous save                 {_spread(get['save'])} = {rate(sync)}, "
          f"{100 * plain / sync:.0f}% of the plain rate (goal >= 50%)")
    print(f"  async save: training stall       {_spread(get['stall'])} = {100 * stall / sync:.1f}% of the "
          f"synchronous save (goal <= 10%); of it waiting for an unfinished write {_median(get['waited']):.2f} s")
    print(f"  async save: background           {_spread(get['background'])} = {rate(_median(get['background']))} "
          f"(write + fsync + checksums); {100 * _median(get['background']) / plain:.0f}% of the plain time")
    print(f"  training step while it writes    {busy:.2f} s vs {quiet:.2f} s otherwise "
          f"({len(get['busy_steps'])} / {len(get['quiet_steps'])} steps)")
    print(f"  load (resume)                    {_spread(get['load'])} = {rate(_median(get['load']))}; "
          f"{100 * _median(get['load']) / plain:.0f}% of the plain write time, reading the files "
          f"takes {_median(get['read']):.2f} s")
    if get["load_each_reads"]:
        print(f"  load, --no-ckpt-fully-parallel-load {_spread(get['load_each_reads'])}")
    print(f"  checksum verification (1 process) {_spread(get['verify'])}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="Where checkpoints go (default: a temporary folder).")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ranks", default="1,2", help="Comma-separated rank counts to measure.")
    p.add_argument("--json", default=None, help="Also write every measurement to this file.")
    args = p.parse_args(argv)
    model = model_args(args.layers, args.hidden)
    work = tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir)
    loads = []
    try:
        results = {int(r): [] for r in args.ranks.split(",")}
        for repeat in range(args.repeats):
            for ranks, rounds in results.items():
                loads.append(os.getloadavg()[0])
                sync = sync_round(work, model, ranks)
                if sync["bytes"] < 2**30:
                    print(f"warning: the checkpoint has {sync['bytes'] / 2**30:.2f} GiB (< 1 GiB); raise --layers")
                result = {**sync, **async_round(work, model, ranks), **load_round(sync, model, ranks)}
                # (3 writes: on a virtual disk the first write to fresh blocks can be several
                # times slower than the next ones; every write counts towards the median)
                result["plain"] = [plain_write(work, sync["bytes"], ranks) for _ in range(3)]
                loads.append(os.getloadavg()[0])
                rounds.append(result)
                for name in os.listdir(work):
                    shutil.rmtree(os.path.join(work, name), ignore_errors=True)
                print(f"[bench] round {repeat + 1}/{args.repeats} at {ranks} rank(s) done", flush=True)
        print(f"\nmachine: {os.cpu_count()} cores; load average during the runs {min(loads):.1f}-{max(loads):.1f} "
              f"(median {_median(loads):.1f})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"load_average": loads, "results": results}, f, indent=1)
        for ranks, rounds in results.items():
            report(ranks, rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
