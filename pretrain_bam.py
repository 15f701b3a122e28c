#!/usr/bin/env python
"""Train dense seeds, branched experts and BAM mixture-of-experts models on megatron-core.

    python pretrain_bam.py --help
    torchrun --nproc-per-node 8 --nnodes 8 ... pretrain_bam.py --bam-attn-experts 4 ...

Flags follow Megatron-LM's names; see ``bam_megatron/training/arguments.py``. The same program is
installed as ``bam-pretrain``.
"""

import sys

from bam_megatron.training import main

if __name__ == "__main__":
    sys.exit(main())
