"""torchrun, with the same flags, whose agent passes stop signals on to its ranks.

    python tools/torchrun.py --nproc-per-node 8 pretrain_bam.py ... --exit-signal-handler
    bam-torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT pretrain_bam.py ...

Plain torchrun exits 1 after a SIGTERM whatever its ranks do, SIGKILLs ranks still saving after
``--shutdown-timeout`` (30 s), and dies of SIGUSR1 unless ``--signals-to-handle`` lists it
(taking its ranks with it). This launcher
gives SIGTERM, SIGUSR1, SIGUSR2 and SIGHUP to the ranks and waits for them like for any run: with
``--exit-signal-handler`` they save and exit 0, and so does the launcher
(``bam_megatron/patches/torchrun_signals.py``). Everything else is torchrun's.
"""

from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    from bam_megatron.patches import torchrun_signals

    with torchrun_signals.passed_on():
        from torch.distributed.run import main as torchrun_main

        torchrun_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
