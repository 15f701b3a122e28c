"""The console programs (``bam-pretrain``, ``bam-upcycle``, ``bam-hf-import``, ...; see
``pyproject.toml``): each parses its arguments before importing torch or megatron-core."""
