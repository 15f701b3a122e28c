#!/usr/bin/env python
"""Tokenize a jsonl corpus into Megatron indexed datasets (.bin + .idx); see bam_megatron/cli/preprocess.py.

The program lives in the installed package (``pip install -e .``); this file keeps Megatron-LM's
familiar ``tools/preprocess_data.py`` name.
"""

import sys

from bam_megatron.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
