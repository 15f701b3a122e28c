#!/usr/bin/env python
"""Add an expert to a mixture of experts; see bam_megatron/cli/add_expert.py.

The program lives in the installed package (``pip install -e .``); this file keeps the
``tools/`` name beside the other tools.
"""

import sys

from bam_megatron.cli.add_expert import main

if __name__ == "__main__":
    sys.exit(main())
