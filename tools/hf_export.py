#!/usr/bin/env python
"""Export a checkpoint of this project as a Hugging Face model folder; see bam_megatron/cli/hf_export.py.

The program lives in the installed package (``pip install -e .``); this file is the
``tools/hf_export.py`` name the documentation uses.
"""

import sys

from bam_megatron.cli.hf_export import main

if __name__ == "__main__":
    sys.exit(main())
