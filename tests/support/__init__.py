"""Test support: the repository root, tiny model configurations, a multi-process harness."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
