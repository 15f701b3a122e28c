"""Checkpoints in Megatron-LM's layout, torch_dist format: the directory layout and the one
resolver, the common state, model weights at any layout, training state (optimizer, scheduler, RNG),
streamed DCP reading / writing for the tools, and inspection."""
