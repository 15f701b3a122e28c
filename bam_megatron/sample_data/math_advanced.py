"""Math text for the sample corpus, continued: algebra, word problems, sequences, calculus."""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Dict

from bam_megatron.sample_data.math_basics import (
    ITEMS,
    NAMES,
    VEHICLES,
    _decimal,
    _frac,
    _linear_str,
    _paren,
    _plural,
    _poly_eval,
    _signed_term,
    poly_str,
)

# -- algebra ----------------------------------------------------------------------------------


def p_linear_equation(rng: random.Random):
    x = rng.randint(-12, 15)
    a = rng.choice([i for i in range(-9, 10) if i not in (0, 1)])
    b = rng.randint(-30, 30)
    if rng.random() < 0.5 or b == 0:
        c = a * x + b
        steps = []
        if b:
            verb = "Subtract" if b > 0 else "Add"
            steps.append(f"{verb} {abs(b)} {'from' if b > 0 else 'to'} both sides: {a}x = {c - b}.")
        steps.append(f"Divide both sides by {a}: x = {_frac(Fraction(c - b, a))}.")
        steps.append(f"Check: {a} * {_paren(x)} + {_paren(b)} = {a * x + b}.")
        return (f"Solve {_linear_str(a, b)} = {c}.", "\n".join(steps), f"x = {x}")
    cc = rng.choice([i for i in range(-6, 7) if i != a])
    d = a * x + b - cc * x
    lhs, rhs = _linear_str(a, b), _linear_str(cc, d)
    steps = [f"Move the x terms to the left: {a}x - {_paren(cc)}x = {a - cc}x.",
             f"Move the constants to the right: {_paren(d)} - {_paren(b)} = {d - b}.",
             f"So {a - cc}x = {d - b}, and x = {d - b} / {_paren(a - cc)} = "
             f"{_frac(Fraction(d - b, a - cc))}.",
             f"Check: left side {a * x + b}, right side {cc * x + d}."]
    return (f"Solve for x: {lhs} = {rhs}.", "\n".join(steps), f"x = {x}")


def p_linear_system(rng: random.Random):
    x, y = rng.randint(-8, 10), rng.randint(-8, 10)
    while True:
        a1, b1, a2, b2 = (rng.randint(-6, 7) for _ in range(4))
        if a1 and b1 and a2 and b2 and a1 * b2 - a2 * b1 != 0:
            break
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    e1 = poly_str({1: a1}, "x") + _signed_term(b1, 1, "y")
    e2 = poly_str({1: a2}, "x") + _signed_term(b2, 1, "y")
    det = a1 * b2 - a2 * b1
    sol = (f"Eliminate y: multiply the first equation by {b2} and the second by {b1}, then "
           f"subtract.\n({a1} * {_paren(b2)} - {_paren(a2)} * {_paren(b1)})x = "
           f"{c1} * {_paren(b2)} - {_paren(c2)} * {_paren(b1)}\n"
           f"{det}x = {c1 * b2 - c2 * b1}, so x = {x}.\n"
           f"Substitute into the first equation: {a1} * {_paren(x)}{_signed_term(b1, 1, 'y')} = "
           f"{c1}, so {poly_str({1: b1}, 'y')} = {c1 - a1 * x} and y = {y}.\n"
           f"Check the second: {a2} * {_paren(x)} + {_paren(b2)} * {_paren(y)} = {c2}.")
    return (f"Solve the system:\n{e1} = {c1}\n{e2} = {c2}", sol, f"x = {x}, y = {y}")


def p_quadratic(rng: random.Random):
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    p, q = -(r1 + r2), r1 * r2
    eq = poly_str({2: 1, 1: p, 0: q})
    f1 = f"(x{_signed_term(-r1, 0)})" if r1 else "x"
    f2 = f"(x{_signed_term(-r2, 0)})" if r2 else "x"
    if not r2:
        f1, f2 = f2, f1
    sol = (f"Look for two numbers whose product is {q} and whose sum is {p}: "
           f"{_paren(-r1)} and {_paren(-r2)}.\n{eq} = {f1}{f2}.\n")
    if r1 == r2:
        sol += f"The factor repeats, so there is one root: x = {r1}."
        ans = f"x = {r1}"
    else:
        lo, hi = sorted((r1, r2))
        sol += f"A product is zero when a factor is zero: x = {r1} or x = {r2}."
        ans = f"x = {lo} or x = {hi}"
    disc = p * p - 4 * q
    sol += f"\nThe discriminant is {_paren(p)}^2 - 4 * {_paren(q)} = {disc}."
    return (f"Solve {eq} = 0.", sol, ans)


def _pterm(c: int) -> str:
    """``c*x`` as a factor: ``3x``, ``(-2x)``."""
    s = poly_str({1: c})
    return f"({s})" if c < 0 else s


def p_expand(rng: random.Random):
    a, b, c, d = (rng.choice([i for i in range(-7, 8) if i]) for _ in range(4))
    res = {2: a * c, 1: a * d + b * c, 0: b * d}
    return (f"Expand ({_linear_str(a, b)})({_linear_str(c, d)}).",
            f"First: {poly_str({1: a})} * {_pterm(c)} = {poly_str({2: a * c})}. "
            f"Outer: {poly_str({1: a})} * {_paren(d)} = {poly_str({1: a * d})}. "
            f"Inner: {_paren(b)} * {_pterm(c)} = {poly_str({1: b * c})}. "
            f"Last: {_paren(b)} * {_paren(d)} = {b * d}.\n"
            f"Combine like terms: {poly_str(res)}.", poly_str(res))


# -- word problems ----------------------------------------------------------------------------


def p_ages(rng: random.Random):
    for _ in range(1000):
        child = rng.randint(3, 16)
        years = rng.randint(2, 20)
        later = rng.randint(2, 3)
        num = later * (child + years) - years
        if num % child == 0 and num // child > later:
            times = num // child
            break
    else:  # pragma: no cover - the loop always finds one
        child, years, later, times = 6, 6, 2, 3
    parent, kid = rng.sample(NAMES, 2)
    return (f"{parent} is {times} times as old as {kid}. In {years} years, {parent} will be "
            f"{later} times as old as {kid}. How old is {kid} now?",
            f"Let k be {kid}'s age now; {parent} is {times}k.\n"
            f"In {years} years: {times}k + {years} = {later}(k + {years}).\n"
            f"{times}k + {years} = {later}k + {later * years}\n"
            f"{times - later}k = {later * years - years}\nk = {child}.\n"
            f"Check: now {times * child} and {child}; in {years} years {times * child + years} "
            f"and {child + years}, and {later} * {child + years} = {later * (child + years)}.",
            str(child))


def p_distance(rng: random.Random):
    speed = rng.choice((12, 15, 24, 30, 36, 40, 45, 48, 60, 72, 80, 90))
    hours = Fraction(rng.randint(2, 16), rng.choice((1, 2, 4)))
    vehicle = rng.choice(VEHICLES)
    dist = speed * hours
    if rng.random() < 0.5:
        return (f"A {vehicle} travels at {speed} km/h for {_plural(hours, 'hour')}. How far "
                f"does the {vehicle} go?",
                f"distance = speed * time = {speed} * {_paren(hours)} = {_decimal(dist)} km.",
                f"{_decimal(dist)} km")
    return (f"A {vehicle} covers {_decimal(dist)} km at a steady {speed} km/h. How long does "
            f"the trip take?", f"time = distance / speed = {_decimal(dist)} / {speed} = "
            f"{_frac(hours)} {'hour' if hours == 1 else 'hours'}.", _plural(hours, "hour"))


def p_shopping(rng: random.Random):
    (s1, p1), (s2, p2) = rng.sample(ITEMS, 2)
    c1, c2 = rng.randint(2, 9), rng.randint(3, 15)
    n1, n2 = rng.randint(2, 9), rng.randint(1, 12)
    total = n1 * c1 + n2 * c2
    who = rng.choice(NAMES)
    return (f"{p1.capitalize()} cost ${c1} each and {p2} cost ${c2} each. {who} buys {n1} "
            f"{p1} and some {p2} and pays ${total} in all. How many {p2} did {who} buy?",
            f"The {p1} cost {n1} * {c1} = {n1 * c1} dollars.\n"
            f"That leaves {total} - {n1 * c1} = {total - n1 * c1} dollars for {p2}.\n"
            f"{total - n1 * c1} / {c2} = {n2}.", str(n2))


def p_work_rate(rng: random.Random):
    a, b = rng.sample((2, 3, 4, 5, 6, 8, 9, 10, 12, 15), 2)
    t = 1 / (Fraction(1, a) + Fraction(1, b))
    x, y = rng.sample(NAMES, 2)
    return (f"{x} can paint a fence in {a} hours and {y} can paint it in {b} hours. How long "
            f"do they take working together?",
            f"{x} paints 1/{a} of the fence per hour and {y} paints 1/{b}.\n"
            f"Together: 1/{a} + 1/{b} = {_frac(Fraction(1, a) + Fraction(1, b))} per hour.\n"
            f"Time = 1 / ({_frac(Fraction(1, a) + Fraction(1, b))}) = {_frac(t)} hours.",
            _plural(t, "hour"))


def p_consecutive(rng: random.Random):
    k = rng.randint(3, 5)
    n = rng.randint(-10, 60)
    step = rng.choice((1, 2))
    kind = "consecutive integers" if step == 1 else (
        "consecutive even integers" if n % 2 == 0 else "consecutive odd integers")
    nums = [n + step * i for i in range(k)]
    total = sum(nums)
    offs = sum(step * i for i in range(k))
    terms = " + ".join(["n"] + [f"(n + {step * i})" for i in range(1, k)])
    return (f"The sum of {k} {kind} is {total}. Find them.",
            f"Call them {', '.join(['n'] + [f'n + {step * i}' for i in range(1, k)])}.\n"
            f"{terms} = {k}n + {offs} = {total}\n{k}n = {total - offs}, n = {n}.",
            ", ".join(map(str, nums)))


def p_rectangle(rng: random.Random):
    w = rng.randint(2, 30)
    extra = rng.randint(1, 15)
    l = w + extra
    per = 2 * (l + w)
    return (f"A rectangle is {extra} cm longer than it is wide, and its perimeter is {per} cm. "
            f"Find its area.",
            f"Let the width be w; the length is w + {extra}.\n"
            f"2(w + w + {extra}) = {per}, so 4w + {2 * extra} = {per}, 4w = {per - 2 * extra}, "
            f"w = {w}.\nLength = {l}. Area = {l} * {w} = {l * w} square cm.", f"{l * w} cm^2")


# -- sequences --------------------------------------------------------------------------------


def p_arithmetic_sequence(rng: random.Random):
    a, d, n = rng.randint(-10, 20), rng.choice([i for i in range(-5, 9) if i]), rng.randint(8, 40)
    first = ", ".join(str(a + d * i) for i in range(4))
    an = a + (n - 1) * d
    s = n * (a + an) // 2
    return (f"The sequence {first}, ... is arithmetic. Find term {n} and the sum of the first "
            f"{n} terms.",
            f"The first term is {a} and the common difference is {d}.\n"
            f"term {n} = {a} + ({n} - 1) * {_paren(d)} = {an}.\n"
            f"sum = {n} * ({a} + {_paren(an)}) / 2 = {s}.", f"{an}; sum {s}")


def p_geometric_sum(rng: random.Random):
    a, r, n = rng.randint(1, 5), rng.choice((2, 3, -2)), rng.randint(4, 8)
    terms = [a * r ** i for i in range(n)]
    s = a * (r ** n - 1) // (r - 1)
    return (f"Find the sum {' + '.join(_paren(t) for t in terms)}.",
            f"A geometric series with first term {a}, ratio {r} and {n} terms:\n"
            f"sum = {a} * ({_paren(r)}^{n} - 1) / ({r} - 1) = {a} * ({r ** n} - 1) / {r - 1} "
            f"= {s}.", str(s))


# -- calculus ---------------------------------------------------------------------------------


def _rand_poly(rng: random.Random, degree: int) -> Dict[int, Fraction]:
    coefs = {p: Fraction(rng.randint(-9, 9)) for p in range(degree + 1)}
    coefs[degree] = Fraction(rng.choice([i for i in range(-6, 7) if i]))
    return coefs


def _derivative(coefs: Dict[int, Fraction]) -> Dict[int, Fraction]:
    return {p - 1: c * p for p, c in coefs.items() if p > 0 and c != 0}


def p_derivative(rng: random.Random):
    f = _rand_poly(rng, rng.randint(2, 4))
    df = _derivative(f)
    x0 = rng.randint(-3, 3)
    parts = [f"d/dx {poly_str({p: c})} = {poly_str({p - 1: c * p})}"
             for p, c in sorted(f.items(), reverse=True) if p > 0 and c != 0]
    return (f"Let f(x) = {poly_str(f)}. Find f'(x) and f'({x0}).",
            "Use the power rule d/dx x^n = n x^(n-1) on each term:\n" + "\n".join(parts)
            + f"\nSo f'(x) = {poly_str(df)}.\nf'({x0}) = {_frac(_poly_eval(df, x0))}.",
            f"f'(x) = {poly_str(df)}, f'({x0}) = {_frac(_poly_eval(df, x0))}")


def p_integral(rng: random.Random):
    f = _rand_poly(rng, rng.randint(1, 3))
    a = rng.randint(-2, 2)
    b = a + rng.randint(1, 3)
    anti = {p + 1: c / (p + 1) for p, c in f.items() if c != 0}
    fa, fb = _poly_eval(anti, a), _poly_eval(anti, b)
    return (f"Compute the integral of {poly_str(f)} from x = {a} to x = {b}.",
            f"An antiderivative is F(x) = {poly_str(anti)}.\n"
            f"F({b}) = {_frac(fb)} and F({a}) = {_frac(fa)}.\n"
            f"The integral is F({b}) - F({a}) = {_frac(fb)} - {_paren(fa)} = {_frac(fb - fa)}.",
            _frac(fb - fa))


def p_tangent(rng: random.Random):
    f = _rand_poly(rng, 2)
    x0 = rng.randint(-3, 3)
    y0, m = _poly_eval(f, x0), _poly_eval(_derivative(f), x0)
    b = y0 - m * x0
    return (f"Find the tangent line to y = {poly_str(f)} at x = {x0}.",
            f"y({x0}) = {_frac(y0)}. The slope is y' = {poly_str(_derivative(f))} at x = {x0}, "
            f"which is {_frac(m)}.\nThe line is y - {_paren(y0)} = {_frac(m)}(x - {_paren(x0)}), "
            f"that is y = {poly_str({1: m, 0: b})}.", f"y = {poly_str({1: m, 0: b})}")


def p_derivative_rules(rng: random.Random):
    a = rng.choice([i for i in range(-5, 8) if i not in (0, 1)])
    b = rng.randint(1, 9)
    n = rng.randint(2, 6)
    form = rng.randrange(5)
    if form == 0:
        return (f"Differentiate sin({a}x).",
                f"By the chain rule, d/dx sin(u) = cos(u) * u' with u = {a}x and u' = {a}.",
                f"{a}cos({a}x)")
    if form == 1:
        return (f"Differentiate cos({a}x).",
                f"d/dx cos(u) = -sin(u) * u' with u = {a}x and u' = {a}.",
                f"{-a}sin({a}x)")
    if form == 2:
        return (f"Differentiate e^({a}x).",
                f"d/dx e^u = e^u * u' with u = {a}x, so the derivative is {a}e^({a}x).",
                f"{a}e^({a}x)")
    if form == 3:
        return (f"Differentiate ln({abs(a)}x) for x > 0.",
                f"d/dx ln(u) = u' / u = {abs(a)} / ({abs(a)}x) = 1/x.", "1/x")
    return (f"Differentiate ({_linear_str(a, b)})^{n}.",
            f"Chain rule: {n}({_linear_str(a, b)})^{n - 1} * {a}.",
            f"{n * a}({_linear_str(a, b)})^{n - 1}")


def p_limit(rng: random.Random):
    deg = rng.randint(1, 3)
    f, g = _rand_poly(rng, deg), _rand_poly(rng, deg)
    lim = f[deg] / g[deg]
    return (f"Find the limit of ({poly_str(f)}) / ({poly_str(g)}) as x goes to infinity.",
            f"Both have degree {deg}, so the limit is the ratio of the leading coefficients: "
            f"{_frac(f[deg])} / {_paren(g[deg])} = {_frac(lim)}.", _frac(lim))


