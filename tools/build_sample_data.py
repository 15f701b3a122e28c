#!/usr/bin/env python
"""Rebuild the bundled sample corpus and tokenizer (data/); see bam_megatron/sample_data/.

The program lives in the installed package (``pip install -e .``); this file keeps Megatron-LM's
familiar ``tools/build_sample_data.py`` name.
"""

import sys

from bam_megatron.cli.build_sample_data import main

if __name__ == "__main__":
    sys.exit(main())
