"""Downstream evaluation: multiple-choice tasks scored by log-likelihood, the way
lm-evaluation-harness scores its ``multiple_choice`` tasks, on megatron-core models at any layout.

| module | what |
|---|---|
| ``tasks.py`` | the JSONL task schema, reading task files, few-shot prompts |
| ``loglikelihood.py`` | continuation log-likelihoods (lm-evaluation-harness's tokenization and truncation) |
| ``multiple_choice.py`` | ``acc``, ``acc_norm``, ``acc_bytes`` per task |
| ``checkpoint_tasks.py`` | one checkpoint on several task files (what ``tools/evaluate_bam.py --tasks`` runs) |
"""
