#!/usr/bin/env python
"""Domain embeddings for the Nexus router; see bam_megatron/cli/domain_embeddings.py.

The program lives in the installed package (``pip install -e .``); this file keeps the
``tools/`` name beside the other tools.
"""

import sys

from bam_megatron.cli.domain_embeddings import main

if __name__ == "__main__":
    sys.exit(main())
