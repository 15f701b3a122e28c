"""Data: megatron-core GPT datasets and blends, the sampler, tokenizers, and preprocessing."""
