"""Math problems for the sample corpus, basic topics: arithmetic, fractions, number theory, and
the number / polynomial formatting helpers every topic uses. Each ``p_*`` generator takes a
seeded ``random.Random`` and returns ``(question, worked solution, answer)``."""

from __future__ import annotations

import random
from fractions import Fraction
from math import gcd
from typing import Dict

NAMES = ("Ada", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq",
         "Uma", "Victor", "Wen", "Yara", "Zoe")
ITEMS = (("pencil", "pencils"), ("notebook", "notebooks"), ("apple", "apples"),
         ("ticket", "tickets"), ("marble", "marbles"), ("book", "books"), ("stamp", "stamps"),
         ("orange", "oranges"), ("card", "cards"), ("cookie", "cookies"))
VEHICLES = ("train", "car", "bus", "boat", "truck", "ferry", "motorbike")


def _frac(q: Fraction) -> str:
    """A fraction in lowest terms: ``3``, ``-5/4``."""
    q = Fraction(q)
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _paren(q: Fraction) -> str:
    s = _frac(q)
    return f"({s})" if ("/" in s or s.startswith("-")) else s


def _decimal(q: Fraction) -> str:
    """An exact decimal when the denominator allows one (``37.5``), else the fraction."""
    q = Fraction(q)
    if q.denominator == 1:
        return str(q.numerator)
    d, twos, fives = q.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return _frac(q)
    places = max(twos, fives)
    digits = str(abs(q.numerator) * (10 ** places // q.denominator)).rjust(places + 1, "0")
    return ("-" if q < 0 else "") + digits[:-places] + "." + digits[-places:]


def _money(q: Fraction) -> str:
    q = Fraction(q)
    if q.denominator == 1:
        return f"${q.numerator}"
    return f"${float(q):.2f}"


def _plural(q: Fraction, word: str) -> str:
    return f"{_mixed(q)} {word}" + ("" if q == 1 else "s")


def _mixed(q: Fraction) -> str:
    """An improper fraction as a mixed number when it is one: ``7/3 = 2 1/3``."""
    if q.denominator == 1 or abs(q) < 1:
        return _frac(q)
    whole = int(abs(q)) * (1 if q > 0 else -1)
    rest = abs(q - whole)
    return f"{whole} {_frac(rest)}"


def _signed_term(coef: Fraction, power: int, var: str = "x", first: bool = False) -> str:
    """One polynomial term with its sign (`` + 3x^2``, ``-x``, `` - 5``)."""
    coef = Fraction(coef)
    sign = "-" if coef < 0 else "+"
    mag = abs(coef)
    if power == 0:
        body = _frac(mag)
    else:
        c = "" if mag == 1 else (_frac(mag) if mag.denominator == 1 else f"({_frac(mag)})")
        body = c + (var if power == 1 else f"{var}^{power}")
    if first:
        return ("-" if sign == "-" else "") + body
    return f" {sign} {body}"


def poly_str(coefs: Dict[int, Fraction], var: str = "x") -> str:
    """A polynomial {power: coefficient} written from the highest power down."""
    terms = [(p, Fraction(c)) for p, c in sorted(coefs.items(), reverse=True) if c != 0]
    if not terms:
        return "0"
    return "".join(_signed_term(c, p, var, first=(i == 0)) for i, (p, c) in enumerate(terms))


def _poly_eval(coefs: Dict[int, Fraction], x: Fraction) -> Fraction:
    return sum((Fraction(c) * Fraction(x) ** p for p, c in coefs.items()), Fraction(0))


def _linear_str(a: int, b: int, var: str = "x") -> str:
    return poly_str({1: a, 0: b}, var)


# -- arithmetic -------------------------------------------------------------------------------


def p_column_addition(rng: random.Random):
    a, b = rng.randint(100, 99999), rng.randint(10, 9999)
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    places = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        extra = f" + {carry}" if carry else ""
        note = f", write {s % 10} and carry 1" if s >= 10 else f", write {s}"
        steps.append(f"{places[i].capitalize()}: {x} + {y}{extra} = {s}{note}.")
        carry = s // 10
    if carry:
        steps.append("Write the final carry 1.")
    q = rng.choice(("Compute", "Add", "Find the sum:", "What is"))
    end = "?" if q == "What is" else "."
    return (f"{q} {a} + {b}{end}",
            "Add column by column from the right.\n" + "\n".join(steps)
            + f"\nSo {a} + {b} = {a + b}.", str(a + b))


def p_subtraction(rng: random.Random):
    a = rng.randint(200, 9999)
    b = rng.randint(10, a - 1)
    return (f"{rng.choice(('Compute', 'Evaluate', 'Subtract:'))} {a} - {b}.",
            f"{a} - {b} = {a - b}. Check: {a - b} + {b} = {a}.", str(a - b))


def p_multiplication(rng: random.Random):
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    tens, ones = b // 10 * 10, b % 10
    if ones == 0:
        sol = f"{a} * {b} = {a} * {b // 10} * 10 = {a * (b // 10)} * 10 = {a * b}."
    else:
        sol = (f"Split {b} = {tens} + {ones}.\n{a} * {tens} = {a * tens}\n{a} * {ones} = "
               f"{a * ones}\n{a * tens} + {a * ones} = {a * b}.")
    return (f"{rng.choice(('Compute', 'Multiply:', 'Find'))} {a} * {b}.", sol, str(a * b))


def p_division(rng: random.Random):
    d = rng.randint(3, 19)
    q = rng.randint(12, 400)
    r = rng.randint(0, d - 1)
    n = d * q + r
    sol = f"{d} * {q} = {d * q}, and {n} - {d * q} = {r}, which is less than {d}.\n"
    if r:
        sol += f"So {n} = {d} * {q} + {r}: the quotient is {q} and the remainder is {r}."
        ans = f"{q} remainder {r}"
    else:
        sol += f"So {n} / {d} = {q} exactly."
        ans = str(q)
    return (f"Divide {n} by {d}.", sol, ans)


def p_order_of_operations(rng: random.Random):
    a, b, c, d = (rng.randint(2, 12) for _ in range(4))
    form = rng.randrange(4)
    if form == 0:
        expr = f"{a} + {b} * {c}"
        steps = [f"Multiply first: {b} * {c} = {b * c}.", f"Then add: {a} + {b * c} = {a + b * c}."]
        val = a + b * c
    elif form == 1:
        expr = f"({a} + {b}) * {c} - {d}"
        steps = [f"Parentheses first: {a} + {b} = {a + b}.",
                 f"Multiply: {a + b} * {c} = {(a + b) * c}.",
                 f"Subtract: {(a + b) * c} - {d} = {(a + b) * c - d}."]
        val = (a + b) * c - d
    elif form == 2:
        expr = f"{a} * {b} - {c} * {d}"
        steps = [f"Multiplications first: {a} * {b} = {a * b} and {c} * {d} = {c * d}.",
                 f"Subtract: {a * b} - {c * d} = {a * b - c * d}."]
        val = a * b - c * d
    else:
        e = rng.randint(2, 3)
        expr = f"{a}^{e} - {b} + {c} * {d}"
        steps = [f"Powers first: {a}^{e} = {a ** e}.", f"Multiply: {c} * {d} = {c * d}.",
                 f"Left to right: {a ** e} - {b} = {a ** e - b}, then {a ** e - b} + {c * d} = "
                 f"{a ** e - b + c * d}."]
        val = a ** e - b + c * d
    return (f"Evaluate {expr}.", "\n".join(steps), str(val))


def p_percent(rng: random.Random):
    price = rng.choice((20, 40, 50, 60, 80, 120, 150, 200, 240, 360))
    pct = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 75))
    item = rng.choice(("jacket", "bicycle", "lamp", "backpack", "chair", "kettle"))
    off = Fraction(price * pct, 100)
    if rng.random() < 0.5:
        return (f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price?",
                f"The discount is {pct}% of {price} = {pct}/100 * {price} = {_decimal(off)}.\n"
                f"Sale price: {price} - {_decimal(off)} = {_decimal(price - off)}.",
                _money(price - off))
    return (f"What is {pct}% of {price}?",
            f"{pct}% means {pct}/100, so {pct}/100 * {price} = {price * pct}/100 = "
            f"{_decimal(off)}.", _decimal(off))


# -- fractions --------------------------------------------------------------------------------


def _rand_fraction(rng: random.Random, max_den: int = 12) -> Fraction:
    while True:
        den = rng.randint(2, max_den)
        q = Fraction(rng.randint(1, 2 * den - 1), den)
        if q.denominator != 1:
            return q


def p_fraction_add(rng: random.Random):
    x, y = _rand_fraction(rng), _rand_fraction(rng)
    op = rng.choice("+-")
    if op == "-" and x < y:
        x, y = y, x
    lcd = x.denominator * y.denominator // gcd(x.denominator, y.denominator)
    nx, ny = x.numerator * (lcd // x.denominator), y.numerator * (lcd // y.denominator)
    raw = nx + ny if op == "+" else nx - ny
    res = Fraction(raw, lcd)
    sol = (f"The least common denominator of {x.denominator} and {y.denominator} is {lcd}.\n"
           f"{_frac(x)} = {nx}/{lcd} and {_frac(y)} = {ny}/{lcd}.\n"
           f"{nx}/{lcd} {op} {ny}/{lcd} = {raw}/{lcd}")
    sol += f" = {_frac(res)}." if gcd(raw, lcd) != 1 else "."
    if res.denominator != 1 and res > 1:
        sol += f" As a mixed number: {_mixed(res)}."
    return (f"Compute {_frac(x)} {op} {_frac(y)}.", sol, _frac(res))


def p_fraction_mul(rng: random.Random):
    x, y = _rand_fraction(rng, 9), _rand_fraction(rng, 9)
    if rng.random() < 0.5:
        raw_n, raw_d = x.numerator * y.numerator, x.denominator * y.denominator
        res = x * y
        sol = (f"Multiply numerators and denominators: ({x.numerator} * {y.numerator}) / "
               f"({x.denominator} * {y.denominator}) = {raw_n}/{raw_d}")
        q = f"Compute ({_frac(x)}) * ({_frac(y)})."
    else:
        raw_n, raw_d = x.numerator * y.denominator, x.denominator * y.numerator
        res = x / y
        sol = (f"Dividing by {_frac(y)} is multiplying by its reciprocal "
               f"{y.denominator}/{y.numerator}: ({x.numerator} * {y.denominator}) / "
               f"({x.denominator} * {y.numerator}) = {raw_n}/{raw_d}")
        q = f"Compute ({_frac(x)}) / ({_frac(y)})."
    g = gcd(raw_n, raw_d)
    sol += (f". Divide both by {g}: {_frac(res)}." if g > 1 else ", already in lowest terms.")
    return (q, sol, _frac(res))


def p_simplify(rng: random.Random):
    base = Fraction(rng.randint(1, 11), rng.randint(2, 13))
    k = rng.randint(2, 12)
    n, d = base.numerator * k, base.denominator * k
    g = gcd(n, d)
    return (f"Write {n}/{d} in lowest terms.",
            f"gcd({n}, {d}) = {g}. {n} / {g} = {n // g} and {d} / {g} = {d // g}.",
            _frac(Fraction(n, d)))


# -- number theory ----------------------------------------------------------------------------


def p_gcd(rng: random.Random):
    g = rng.randint(2, 30)
    a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
    if a < b:
        a, b = b, a
    steps, x, y = [], a, b
    while y:
        steps.append(f"{x} = {x // y} * {y} + {x % y}")
        x, y = y, x % y
    lcm = a * b // x
    return (f"Find the greatest common divisor and the least common multiple of {a} and {b}.",
            "Euclid's algorithm:\n" + "\n".join(steps)
            + f"\nThe last nonzero remainder is {x}, so gcd({a}, {b}) = {x}.\n"
            f"lcm({a}, {b}) = {a} * {b} / {x} = {lcm}.", f"gcd {x}, lcm {lcm}")


def p_factorize(rng: random.Random):
    primes = (2, 3, 5, 7, 11, 13)
    n = 1
    while n < 30:
        n = 1
        for _ in range(rng.randint(2, 5)):
            n *= rng.choice(primes)
    steps, m, factors = [], n, []
    for p in primes:
        while m % p == 0:
            steps.append(f"{m} / {p} = {m // p}")
            factors.append(p)
            m //= p
    powers = []
    for p in sorted(set(factors)):
        k = factors.count(p)
        powers.append(f"{p}^{k}" if k > 1 else str(p))
    return (f"Write {n} as a product of primes.",
            "Divide by primes, smallest first:\n" + "\n".join(steps)
            + f"\nSo {n} = " + " * ".join(map(str, factors)) + ".", " * ".join(powers))
