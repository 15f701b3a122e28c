#!/usr/bin/env python
"""torchrun whose agent passes stop signals on to its ranks; see bam_megatron/cli/torchrun.py.

The program lives in the installed package (``pip install -e .``); this file is the
``tools/torchrun.py`` name the documentation uses.
"""

import sys

from bam_megatron.cli.torchrun import main

if __name__ == "__main__":
    sys.exit(main())
