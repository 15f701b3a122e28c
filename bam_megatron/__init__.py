"""BAM parameter upcycling on NVIDIA megatron-core."""

__version__ = "0.1.0"
