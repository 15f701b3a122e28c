"""Math text for the sample corpus: problem sets with worked solutions from a seeded generator
(topics in ``math_basics`` and ``math_advanced``)."""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Tuple

from bam_megatron.sample_data.corpus import Document
from bam_megatron.sample_data.math_advanced import (
    p_ages,
    p_arithmetic_sequence,
    p_consecutive,
    p_derivative,
    p_derivative_rules,
    p_distance,
    p_expand,
    p_geometric_sum,
    p_integral,
    p_limit,
    p_linear_equation,
    p_linear_system,
    p_quadratic,
    p_rectangle,
    p_shopping,
    p_tangent,
    p_work_rate,
)
from bam_megatron.sample_data.math_basics import (  # noqa: F401  (re-exported)
    _poly_eval,
    p_column_addition,
    p_division,
    p_factorize,
    p_fraction_add,
    p_fraction_mul,
    p_gcd,
    p_multiplication,
    p_order_of_operations,
    p_percent,
    p_simplify,
    p_subtraction,
    poly_str,
)

MATH_TOPICS: Dict[str, Tuple[Callable[[random.Random], Tuple[str, str, str]], ...]] = {
    "arithmetic": (p_column_addition, p_subtraction, p_multiplication, p_division,
                   p_order_of_operations, p_percent),
    "fractions": (p_fraction_add, p_fraction_mul, p_simplify),
    "number theory": (p_gcd, p_factorize),
    "algebra": (p_linear_equation, p_linear_system, p_quadratic, p_expand),
    "word problems": (p_ages, p_distance, p_shopping, p_work_rate, p_consecutive, p_rectangle),
    "sequences": (p_arithmetic_sequence, p_geometric_sum),
    "calculus": (p_derivative, p_integral, p_tangent, p_derivative_rules, p_limit),
}


def math_problem_set(rng: random.Random, number: int) -> str:
    """One problem set: 1-3 topics, 4-8 problems, each with a worked solution and answer."""
    topics = sorted(rng.sample(sorted(MATH_TOPICS), rng.randint(1, 3)))
    lines = [f"Problem set {number}: {', '.join(topics)}", ""]
    for i in range(1, rng.randint(4, 8) + 1):
        make = rng.choice(MATH_TOPICS[rng.choice(topics)])
        question, solution, answer = make(rng)
        lines += [f"Problem {i}. {question}", f"Solution. {solution}", f"Answer: {answer}", ""]
    return "\n".join(lines)


def math_documents(seed: int, target_bytes: int) -> List[Document]:
    """Problem sets from ``random.Random(seed)`` until they hold ``target_bytes`` of text."""
    rng = random.Random(seed)
    docs, total, number = [], 0, 0
    while total < target_bytes:
        number += 1
        text = math_problem_set(rng, number)
        docs.append(Document(text, f"set-{number:05d}"))
        total += len(text.encode("utf-8"))
    return docs
