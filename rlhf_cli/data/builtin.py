"""Built-in data sets, generated on the fly so that every stage runs with no download.

`arith` is the "mix" task measured in shared/research/arith-feasibility.md: one third each of
a+b (a, b in 0..99), a-b (a >= b, both in 0..99) and a*b (a in 0..99, b in 0..9), written
`Q: 37+45=` with the answer `82` as the completion. Its answers can be checked exactly, so learning
is measurable (held-out exact-match accuracy) and later RL stages can reward correctness.
`arith_eval` is a fixed held-out set of 500 problems that never appear in `arith`.

Preference sets on the same problems (held-out problems excluded from training again):
`arith_prefs` / `arith_prefs_eval` pair the right answer (chosen) with a wrong one (rejected):
the result of another operation, or a random number of as many digits.
`arith_prefs_near` / `arith_prefs_near_eval` use near misses instead (off by 1-3, or one digit
changed): the pairs a policy half-way through learning the task still gets wrong.
`arith_prefs_mixed` / `arith_prefs_mixed_eval` draw each rejected answer from either kind.
`arith_ranked` gives four answers per prompt, best first: the right one, then wrong ones by
increasing distance from it.
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
    return [_row(*p) for p in _train_problems(random.Random(TRAIN_SEED), TRAIN_ROWS)]


def _wrong_answer(rng: random.Random, a: int, op: str, b: int) -> int:
    """Half the time the result of another operation, else a random number of as many digits.

    These are easy to rank (0.95 after 600 reward-model steps); near misses (`arith_prefs_near`)
    are the SFT model's own kind of mistake, and take a reward model 2,000 steps to reach 0.90.
    """
    right = _solve(a, op, b)
    while True:
        if rng.random() < 0.5:
            wrong = _solve(a, rng.choice([o for o in "+-*" if o != op]), b)
        else:
            digits = len(str(right))
            wrong = rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)
        if wrong != right and wrong >= 0:
            return wrong


def _near_miss(rng: random.Random, a: int, op: str, b: int) -> int:
    """A wrong answer close to the right one: off by 1-3, or one digit changed."""
    right = _solve(a, op, b)
    while True:
        if rng.random() < 0.5:
            wrong = right + rng.choice([-3, -2, -1, 1, 2, 3])
        else:
            digits = list(str(right))
            position = rng.randrange(len(digits))
            digits[position] = rng.choice([d for d in "0123456789" if d != digits[position]])
            wrong = int("".join(digits))
        if wrong != right and wrong >= 0:
            return wrong


def _mixed_wrong(rng: random.Random, a: int, op: str, b: int) -> int:
    return (_near_miss if rng.random() < 0.5 else _wrong_answer)(rng, a, op, b)


def _train_problems(rng: random.Random, count: int) -> list[tuple[int, str, int]]:
    excluded, problems = set(_eval_problems()), []
    while len(problems) < count:
        problem = _problem(rng)
        if problem not in excluded:
            problems.append(problem)
    return problems


def arith_preference_rows(split: str, wrong_answer=_wrong_answer) -> list[dict[str, str]]:
    rng = random.Random(TRAIN_SEED + 1)
    problems = _eval_problems() if split == "eval" else _train_problems(rng, TRAIN_ROWS // 2)
    return [
        {"prompt": f"Q: {a}{op}{b}=", "chosen": str(_solve(a, op, b)), "rejected": str(wrong_answer(rng, a, op, b))}
        for a, op, b in problems
    ]


def arith_ranked_rows() -> list[dict]:
    rng = random.Random(TRAIN_SEED + 2)
    rows = []
    for a, op, b in _train_problems(rng, TRAIN_ROWS // 4):
        right = _solve(a, op, b)
        wrong: set[int] = set()
        while len(wrong) < 3:
            wrong.add(_wrong_answer(rng, a, op, b))
        ranked = [right] + sorted(wrong, key=lambda w: (abs(w - right), w))
        rows.append({"prompt": f"Q: {a}{op}{b}=", "responses": [str(r) for r in ranked]})
    return rows


BUILTINS = {
    "arith": lambda: arith_rows("train"),
    "arith_eval": lambda: arith_rows("eval"),
    "arith_prefs": lambda: arith_preference_rows("train"),
    "arith_prefs_eval": lambda: arith_preference_rows("eval"),
    "arith_prefs_near": lambda: arith_preference_rows("train", _near_miss),
    "arith_prefs_near_eval": lambda: arith_preference_rows("eval", _near_miss),
    "arith_prefs_mixed": lambda: arith_preference_rows("train", _mixed_wrong),
    "arith_prefs_mixed_eval": lambda: arith_preference_rows("eval", _mixed_wrong),
    "arith_ranked": arith_ranked_rows,
}


def builtin_rows(name: str) -> list[Row]:
    if name not in BUILTINS:
        raise UserError(f"builtin:{name}: no such built-in data set (choose from {', '.join(sorted(BUILTINS))})")
    return [Row(record, f"builtin:{name}#{i + 1}") for i, record in enumerate(BUILTINS[name]())]
