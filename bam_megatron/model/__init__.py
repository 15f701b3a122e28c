"""The BAM model on megatron-core: config, layer specs, the parallel block, Mixture of Attention,
FFN experts and their dispatch, norms, RoPE, SDPA core attention, FLOPs, and ``build_bam_model``."""
