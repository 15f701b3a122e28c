"""Every change this project makes to torch, megatron-core or CPython, and every private API of
theirs it uses, with the releases each targets.

A patch that replaces something is a scoped, reversible context manager: entering it runs its
``check()`` (the installed release, then the shape it relies on: names, parameters, the library
lines it changes; ``target.py``) and fails in one line (``errors.PatchTargetError``) when they do
not fit; leaving it restores what it replaced. Modules that only call or read private API have
the same ``check()``, run before the first use. ``entered()`` names the patches entered now.
``tests/unit/patches`` runs every ``check()`` against the installed libraries and enters and
leaves every patch.

Patches (``MODULES``):

| module | what it changes / uses | scope | entered by |
|---|---|---|---|
| ``cpu_runtime/`` | megatron-core without a GPU: ``torch.cuda.*``, a torch function mode, megatron-core's RNG entry points, ``Thread._bootstrap_inner``, ``Tensor.type()`` for megatron-core's four parameter-type checks, backward through the autograd engine | the run | ``parallel/distributed.init_distributed`` without a GPU (``run.py``) |
| ``megatron_moe.py`` | megatron-core's missing ``moe_utils.te_general_gemm`` (no Transformer Engine) | the run | ``init_distributed`` (``run.py``) |
| ``megatron_save_workers.py`` | megatron-core's checkpoint-writer processes and their manager: deaf to stop signals, dead with their rank | the run; helpers from the first save | ``init_distributed`` (``run.py``); each save (``checkpoint/save.py``, ``checkpoint/weights.py``) |
| ``dcp_safe_reads.py`` | torch DCP's and megatron-core's readers of pickled checkpoint files -> the opener's allow-list | one load | ``checkpoint/opener.dcp_reads`` |
| ``torchrun_signals.py`` | torchrun's agent passes stop signals on to its ranks | the agent's run | ``cli/torchrun.py`` |
| ``megatron_datasets.py`` | subclasses of megatron-core's ``BlendedDataset`` (overrides the private ``_build_indices``) and its builder; nothing replaced | — | ``data/datasets.py`` (checked when a builder is made) |
| ``megatron_optimizer.py`` | calls megatron-core's private ``DistributedOptimizer._init_optimizer_states_with_dummy_values`` and reads ``HAVE_APEX_OR_TE`` | — | ``checkpoint/optimizer.py`` |
| ``torch_grouped_mm.py`` | calls torch's private ``torch._grouped_mm`` | — | ``model/experts.py`` (Hopper GPUs) |
| ``dcp_storage.py`` | reads torch DCP's private ``_StorageInfo`` and the ``.distcp`` layout, calls ``planner_helpers`` | — | ``checkpoint/dcp_reader.py``, ``checkpoint/dcp_writer.py`` |

``run.py`` enters the run's patches; ``target.py`` is the machinery (``Release``, ``Check``,
``Replacements``, ``Shared``).

Other uses of library internals, outside this folder, and why they stay where they are (none
replaces anything of the library, and each is covered by the tests of its module):

- ``model/dispatch.py`` gives megatron-core ``MoELayer`` instances whose experts are all local
  another ``token_dispatcher`` (an instance attribute: that layer only, sync-free dispatch);
- ``inference/pipeline.py`` turns a ``GPTModel``'s ``post_process`` off for one forward (the
  output layer on the selected positions only) and back on;
- ``data/tokenizers.py`` sets the ``_tokenizer`` of megatron-core's null tokenizer object to a
  checked one (the object's class names megatron-core's dataset caches);
- ``hf/registry.py`` sets the BAM classes as attributes of the ``transformers`` package (how
  ``transformers serve`` finds a class by name; idempotent, adds names only);
- ``hf/bam_model/modeling_bam.py`` reads ``config._attn_implementation`` as transformers' own
  models do (its documented way of choosing the attention kernel);
- ``library_messages.py`` filters a documented list of library warnings for a program's run (a
  setting of the program, not a change of a library).
"""

from bam_megatron.patches.target import entered

MODULES = (
    "cpu_runtime",
    "megatron_moe",
    "megatron_save_workers",
    "dcp_safe_reads",
    "torchrun_signals",
    "megatron_datasets",
    "megatron_optimizer",
    "torch_grouped_mm",
    "dcp_storage",
)

__all__ = ["MODULES", "entered"]
