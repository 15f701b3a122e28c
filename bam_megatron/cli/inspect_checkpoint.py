"""Show what a torch_dist checkpoint holds, without loading its tensors.

    python tools/inspect_checkpoint.py ckpt/bam            # readable text
    python tools/inspect_checkpoint.py ckpt/bam --json     # for scripts

Lists the model tensors (global shape, dtype), the iteration, whether optimizer / RNG state is
present, the recorded arguments and the expert layout: attention experts and KV mode, FFN
experts and routers, per layer. Works on checkpoints of ``pretrain_bam.py``, of
``tools/upcycle_bam.py`` and on Megatron-LM GPT torch_dist checkpoints (a checkpoint root with
its tracker, or one ``iter_*`` directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from bam_megatron.checkpoint.opener.options import add_open_args
from bam_megatron.cli.console import user_error
from bam_megatron.library_messages import quiet_libraries


def main(argv: Optional[List[str]] = None) -> int:
    quiet_libraries()
    p = argparse.ArgumentParser(prog="inspect_checkpoint.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("checkpoint", help="Checkpoint root (with tracker) or iter_* directory.")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    p.add_argument("--all", action="store_true", help="Also list optimizer, RNG and extra-state entries.")
    p.add_argument("--no-args", action="store_true", help="Leave out the recorded arguments (text output).")
    p.add_argument("--verify", action="store_true",
                   help="Check that every file is whole: the index and the data files it points into, and each file "
                   "against its recorded checksum. Exit status 1 and one line naming the first damaged file otherwise.")
    add_open_args(p)
    args = p.parse_args(argv)
    from bam_megatron.checkpoint.inspection import format_inspection, inspect_checkpoint, verify
    from bam_megatron.checkpoint.opener import open_options
    from bam_megatron.errors import BAMError

    try:
        if args.verify:
            print(verify(args.checkpoint, progress=lambda m: print(m, file=sys.stderr, flush=True),
                         options=open_options(args)), flush=True)
            return 0
        info = inspect_checkpoint(args.checkpoint, include_all=args.all, options=open_options(args))
    except BAMError as exc:
        return user_error("inspect_checkpoint.py", exc)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        print(format_inspection(info, show_args=not args.no_args))
    return 0

