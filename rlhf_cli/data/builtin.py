"""Built-in data sets, generated on the fly so that every stage runs with no download.

`arith` is the "mix" task measured in shared/research/arith-feasibility.md: one third each of
a+b (a, b in 0..99), a-b (a >= b, both in 0..99) and a*b (a in 0..99, b in 0..9), written
`Q: 37+45=` with the answer `82` as the completion. Its answers can be checked exactly, so learning
is measurable (held-out exact-match accuracy) and later RL stages can reward correctness.
`arith_eval` is a fixed held-out set of 500 problems that never appear in `arith`.
"""

from __future__ import annotations

import random

from rlhf_cli.data.sources import Row
from rlhf_cli.errors import UserError

TRAIN_ROWS = 20_000
EVAL_ROWS = 500
EVAL_SEED = 1234
TRAIN_SEED = 0


def _problem(rng: random.Random) -> tuple[int, str, int]:
    op = rng.choice("+-*")
    if op == "+":
        return rng.randint(0, 99), op, rng.randint(0, 99)
    if op == "-":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return max(a, b), op, min(a, b)
    return rng.randint(0, 99), op, rng.randint(0, 9)


def _solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _row(a: int, op: str, b: int) -> dict[str, str]:
    answer = str(_solve(a, op, b))
    return {"prompt": f"Q: {a}{op}{b}=", "completion": answer, "answer": answer}


def _eval_problems() -> list[tuple[int, str, int]]:
    rng, seen, problems = random.Random(EVAL_SEED), set(), []
    while len(problems) < EVAL_ROWS:
        problem = _problem(rng)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems


def arith_rows(split: str) -> list[dict[str, str]]:
    held_out = _eval_problems()
    if split == "eval":
        return [_row(*p) for p in held_out]
    excluded, rng, rows = set(held_out), random.Random(TRAIN_SEED), []
    while len(rows) < TRAIN_ROWS:
        problem = _problem(rng)
        if problem not in excluded:
            rows.append(_row(*problem))
    return rows


BUILTINS = {
    "arith": lambda: arith_rows("train"),
    "arith_eval": lambda: arith_rows("eval"),
}


def builtin_rows(name: str) -> list[Row]:
    if name not in BUILTINS:
        raise UserError(f"builtin:{name}: no such built-in data set (choose from {', '.join(sorted(BUILTINS))})")
    return [Row(record, f"builtin:{name}#{i + 1}") for i, record in enumerate(BUILTINS[name]())]
