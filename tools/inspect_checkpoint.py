#!/usr/bin/env python
"""Show what a torch_dist checkpoint holds, without loading its tensors; see bam_megatron/cli/inspect_checkpoint.py.

The program lives in the installed package (``pip install -e .``); this file keeps Megatron-LM's
familiar ``tools/inspect_checkpoint.py`` name.
"""

import sys

from bam_megatron.cli.inspect_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
