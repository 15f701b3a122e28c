#!/usr/bin/env python
"""Serve an exported model behind an OpenAI-compatible endpoint; see bam_megatron/cli/serve.py.

The program lives in the installed package (``pip install -e '.[serve]'``); this file is the
``tools/serve.py`` name the documentation uses.
"""

import sys

from bam_megatron.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
