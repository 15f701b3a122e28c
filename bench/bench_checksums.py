"""Cost of checkpoint checksums: CRC-32 of checkpoint-sized files, per GiB.

    python bench/bench_checksums.py [--gib 2] [--files 4] [--dir /scratch]

Writes ``--files`` files totalling ``--gib`` GiB of random bytes (as a rank's ``.distcp`` files),
then times ``checkpoint.integrity.checksum_files`` on them: right after writing (the page cache
holds them, as at save time) and once more. Prints seconds and seconds per GiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--dir", default=None, help="Where to write the files (default: a temporary folder).")
    args = p.parse_args(argv)
    from bam_megatron.checkpoint import integrity

    work = tempfile.mkdtemp(prefix="bench-checksums-", dir=args.dir)
    try:
        per_file = int(args.gib * 2**30 / args.files)
        block = os.urandom(16 << 20)
        names = []
        start = time.perf_counter()
        for i in range(args.files):
            name = f"__0_{i}.distcp"
            with open(os.path.join(work, name), "wb") as f:
                for _ in range(per_file // len(block)):
                    f.write(block)
            names.append(name)
        write = time.perf_counter() - start
        total = sum(os.path.getsize(os.path.join(work, n)) for n in names) / 2**30
        for label in ("after writing", "again"):
            start = time.perf_counter()
            integrity.checksum_files(work, names)
            seconds = time.perf_counter() - start
            print(f"crc32 {label}: {total:.2f} GiB in {seconds:.2f} s = {seconds / total:.2f} s/GiB "
                  f"(writing them took {write / total:.2f} s/GiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
