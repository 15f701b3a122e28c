#!/usr/bin/env python
"""The Mix phase: one BAM mixture-of-experts checkpoint from N dense checkpoints; see bam_megatron/cli/upcycle.py.

The program lives in the installed package (``pip install -e .``); this file keeps Megatron-LM's
familiar ``tools/upcycle_bam.py`` name.
"""

import sys

from bam_megatron.cli.upcycle import main

if __name__ == "__main__":
    sys.exit(main())
