#!/usr/bin/env python
"""Per-domain perplexity of checkpoints and routing statistics; see bam_megatron/cli/evaluate.py.

The program lives in the installed package (``pip install -e .``); this file keeps Megatron-LM's
familiar ``tools/evaluate_bam.py`` name.
"""

import sys

from bam_megatron.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
