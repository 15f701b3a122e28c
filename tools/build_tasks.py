#!/usr/bin/env python
"""Rebuild the bundled multiple-choice tasks (data/tasks/); see bam_megatron/cli/build_tasks.py.

The program lives in the installed package (``pip install -e .``); this file keeps a ``tools/``
name beside the other programs.
"""

import sys

from bam_megatron.cli.build_tasks import main

if __name__ == "__main__":
    sys.exit(main())
