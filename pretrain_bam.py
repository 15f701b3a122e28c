#!/usr/bin/env python
"""Train dense seeds, branched experts and BAM mixture-of-experts models on megatron-core.

    python pretrain_bam.py --help
    torchrun --nproc-per-node 8 --nnodes 8 ... pretrain_bam.py --bam-attn-experts 4 ...

Flags follow Megatron-LM's names; see ``bam_megatron/arguments.py``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bam_megatron.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
