#!/usr/bin/env python
"""Generate text with a trained checkpoint (KV cache); see bam_megatron/cli/generate.py.

The program lives in the installed package (``pip install -e .``); this file keeps a
``tools/`` name beside Megatron-LM's familiar ones.
"""

import sys

from bam_megatron.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
