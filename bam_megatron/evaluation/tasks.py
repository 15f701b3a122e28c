"""Multiple-choice task files: the schema, reading them, few-shot prompts.

A task file is JSON Lines, one item per line::

    {"context": "The capital of France is", "choices": [" Paris", " Rome", " Oslo"], "gold": 0}

- ``context`` (string): the text the model reads.
- ``choices`` (list of at least two strings): candidate continuations; each is appended to the
  context exactly as written (put the separating space inside the choice).
- ``gold`` (int): the index of the right choice.
- ``id`` (optional string) and any other fields are kept but not used.

Few-shot (``num_fewshot = k``): ``k`` other items of the same file, drawn with a generator seeded
by ``seed`` and the item's index, each written as its context followed by its right choice, are
put before the item's context, separated by ``delimiter`` (lm-evaluation-harness's default
``"\\n\\n"``).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import List

from bam_megatron.errors import InferenceError

FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question."""

    id: str
    context: str
    choices: List[str]
    gold: int


def _item(obj, where: str, index: int) -> MCItem:
    if not isinstance(obj, dict):
        raise InferenceError(f"{where} is not a JSON object; see the task schema in bam_megatron/evaluation/tasks.py")
    context, choices, gold = obj.get("context"), obj.get("choices"), obj.get("gold")
    if not isinstance(context, str):
        raise InferenceError(f'{where} needs "context" (a string)')
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise InferenceError(f'{where} needs "choices" (a list of at least two non-empty strings)')
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise InferenceError(f'{where} needs "gold" (an index into its {len(choices)} choices), got {gold!r}')
    return MCItem(str(obj.get("id", index)), context, list(choices), gold)


def load_task(path: str) -> List[MCItem]:
    """The items of a JSONL task file.

    Raises:
        InferenceError: the file is missing, empty or an item breaks the schema (one line naming
            the file and line).
    """
    if not os.path.isfile(path):
        raise InferenceError(f"task file {path} does not exist; pass a JSONL file of multiple-choice items")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InferenceError(f"{path}:{n} is not JSON ({exc.msg})") from None
            items.append(_item(obj, f"{path}:{n}", len(items)))
    if not items:
        raise InferenceError(f"task file {path} holds no items")
    return items


def fewshot_prefix(items: List[MCItem], index: int, num_fewshot: int, seed: int = 1234,
                   delimiter: str = FEWSHOT_DELIMITER) -> str:
    """The solved examples put before item ``index``'s context ("" for zero-shot)."""
    if num_fewshot <= 0:
        return ""
    others = [j for j in range(len(items)) if j != index]
    if num_fewshot > len(others):
        raise InferenceError(f"--num-fewshot {num_fewshot} needs more items than the task's {len(items)}")
    chosen = random.Random(f"{seed}:{index}").sample(others, num_fewshot)
    return "".join(items[j].context + items[j].choices[items[j].gold] + delimiter for j in chosen)
