"""The embedded sequence-to-sequence task: English dates, many surface forms ► ISO 8601.

"the twenty-third of march, nineteen ninety-four" ► "1994-03-23". A real, learnable mapping
with reordering (the year moves to the front, the month becomes a number), generated locally
from a seed: no download. Dates are drawn uniformly from 1900-01-01 to 2099-12-31.
"""

from __future__ import annotations

import datetime as dt
import random

MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ORDINAL_ONES = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}


def words(n: int) -> str:
    """0..99 in words: 42 ► 'forty-two'."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def ordinal_words(n: int) -> str:
    """1..31 as an ordinal in words: 23 ► 'twenty-third'."""
    w = words(n)
    head, _, last = w.rpartition("-")
    if last in ORDINAL_ONES:
        last = ORDINAL_ONES[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return f"{head}-{last}" if head else last


def ordinal_digits(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def year_words(y: int, rng: random.Random) -> str:
    hi, lo = divmod(y, 100)
    if y == 2000:
        return "two thousand"
    if 2001 <= y <= 2009 or (y >= 2010 and rng.random() < 0.3):
        return "two thousand and " + words(y - 2000) if y - 2000 < 100 else words(y)
    return f"{words(hi)} {'oh ' + words(lo) if 0 < lo < 10 else ('hundred' if lo == 0 else words(lo))}"


def render(d: dt.date, rng: random.Random) -> str:
    month = MONTHS[d.month - 1]
    day_forms = [str(d.day), ordinal_digits(d.day), ordinal_words(d.day)]
    year = year_words(d.year, rng) if rng.random() < 0.5 else str(d.year)
    day = rng.choice(day_forms)
    style = rng.randrange(5)
    if style == 0:
        return f"{month} {day}, {year}"
    if style == 1:
        return f"{day} {month} {year}"
    if style == 2:
        return f"the {rng.choice(day_forms[1:])} of {month}, {year}"
    if style == 3:
        return f"{month} the {rng.choice(day_forms[1:])}, {year}"
    return f"{d.month}/{d.day}/{d.year}"  # US numeric order: month first


def pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (English date, ISO date) pairs, deterministic in ``seed``."""
    rng = random.Random(seed)
    start, span = dt.date(1900, 1, 1).toordinal(), (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days
    out = []
    for _ in range(n):
        d = dt.date.fromordinal(start + rng.randrange(span + 1))
        out.append((render(d, rng), d.isoformat()))
    return out
