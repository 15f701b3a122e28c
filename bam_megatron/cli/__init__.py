"""The console programs (``bam-pretrain``, ``bam-upcycle``, ``bam-inspect``, ``bam-evaluate``,
``bam-preprocess``): each parses its arguments before importing torch or megatron-core."""
