"""Every runtime patch of torch / megatron-core, one module each, each naming the version it targets.

- ``cpu_runtime``: megatron-core 0.16.1 / torch 2.6+ without a GPU (gloo), switched on explicitly.
- ``megatron_moe``: megatron-core 0.16.1 without Transformer Engine (``te_general_gemm``).
- ``megatron_datasets``: megatron-core 0.16.1 ``BlendedDataset`` without a process group.

``tests/unit/patches`` checks each against the installed library, so that an upstream change to
what a patch touches fails a test instead of silently changing behaviour."""
