#!/usr/bin/env python
"""Import a local Hugging Face model folder as a dense checkpoint; see bam_megatron/cli/hf_import.py.

The program lives in the installed package (``pip install -e .``); this file is the
``tools/hf_import.py`` name the documentation uses.
"""

import sys

from bam_megatron.cli.hf_import import main

if __name__ == "__main__":
    sys.exit(main())
