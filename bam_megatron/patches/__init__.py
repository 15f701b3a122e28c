"""Every runtime patch of torch / megatron-core, one module each, each naming the version it targets.

- ``cpu_runtime``: megatron-core 0.16.1 / torch 2.6+ without a GPU (gloo), switched on explicitly.
- ``megatron_moe``: megatron-core 0.16.1 without Transformer Engine (``te_general_gemm``).
- ``megatron_datasets``: megatron-core 0.16.1 ``BlendedDataset`` without a process group.
- ``megatron_save_workers``: megatron-core 0.16.1's checkpoint-writer processes die with their
  rank and never of the run's stop signals.
- ``torchrun_signals``: torch 2.13's torchrun agent passes stop signals on to its ranks and waits
  for them (``tools/torchrun.py``).

``tests/unit/patches`` checks each against the installed library, so that an upstream change to
what a patch touches fails a test instead of silently changing behaviour."""
