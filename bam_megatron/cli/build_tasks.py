"""Rebuild the bundled multiple-choice tasks (``data/tasks/<domain>.jsonl``) from the held-out
documents of the sample corpus; see ``bam_megatron/sample_data/tasks.py``.

    python tools/build_tasks.py                         # data/*_valid.jsonl -> data/tasks/
    python tools/build_tasks.py --data runs/data_large --out runs/data_large/tasks --items 200
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from bam_megatron.cli.console import user_error
from bam_megatron.library_messages import quiet_libraries
from bam_megatron.sample_data.tasks import (
    DEFAULT_CHOICES,
    DEFAULT_CONTEXT_CHARS,
    DEFAULT_CONTINUATION_CHARS,
    DEFAULT_ITEMS,
    DEFAULT_SEED,
    DOMAINS,
)


def main(argv: Optional[List[str]] = None) -> int:
    quiet_libraries()
    p = argparse.ArgumentParser(prog="build_tasks.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--data", default="data", help="Corpus folder with <domain>_valid.jsonl (default: data).")
    p.add_argument("--out", default=None, help="Output folder (default: <data>/tasks).")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), help="Domains (default: all four).")
    p.add_argument("--items", type=int, default=DEFAULT_ITEMS, help=f"Items per domain (default {DEFAULT_ITEMS}).")
    p.add_argument("--choices", type=int, default=DEFAULT_CHOICES, help=f"Choices per item (default {DEFAULT_CHOICES}).")
    p.add_argument("--context-chars", type=int, default=DEFAULT_CONTEXT_CHARS, help="Characters of context (about).")
    p.add_argument("--continuation-chars", type=int, default=DEFAULT_CONTINUATION_CHARS, help="Characters per choice (about).")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = p.parse_args(argv)
    for name in ("items", "context_chars", "continuation_chars"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.choices < 2:
        p.error("--choices must be at least 2")
    from bam_megatron.sample_data.tasks import build_tasks

    try:
        paths = build_tasks(
            args.data, args.out or f"{args.data}/tasks", args.domains, items=args.items, choices=args.choices,
            context_chars=args.context_chars, continuation_chars=args.continuation_chars, seed=args.seed,
        )
    except (OSError, ValueError) as exc:
        return user_error("build_tasks.py", exc)
    for domain, path in paths.items():
        print(f"[build_tasks] {domain}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
