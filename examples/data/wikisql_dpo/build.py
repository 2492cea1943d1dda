"""Build WikiSQL preference pairs offline from the shipped WikiSQL sample (../wikisql).

    python examples/data/wikisql_dpo/build.py   # writes train.jsonl, valid.jsonl, test.jsonl here

Splits: `train.jsonl` 900 pairs and `valid.jsonl` 100 held-out pairs, a seeded random carve of
the WikiSQL train rows (held-out questions; their tables also have questions in train);
`test.jsonl` 100 pairs from the WikiSQL valid rows, whose tables training never sees.

Each WikiSQL row `table … columns … Q: … A: SELECT …` becomes
{"prompt": everything through "A:", "chosen": the real SQL with its selected column in backticks
(the house style: WikiSQL's column names have spaces and slashes, which SQL must quote),
"rejected": the SQL corrupted one way and left unquoted, as WikiSQL writes it}, the corruption
drawn from a generator seeded by the row (so the files are reproducible):

- wrong column: the SELECT column replaced by the column of the WHERE condition (WikiSQL's most
  common mistake: selecting what the question conditions on, not what it asks for), or by another
  column of the table when the two are the same;
- wrong aggregate: an aggregate added to the SELECT column (COUNT, MAX, MIN, SUM, AVG), or the
  one WikiSQL wrote swapped for another.

So a model that prefers the chosen answers quotes the column it selects (a style a model
fine-tuned on WikiSQL never writes: the clear signal), selects the column the question asks
about, with an aggregate only where the question asks for one ("how many", "highest", ...).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "wikisql"
AGGREGATES = ("COUNT", "MAX", "MIN", "SUM", "AVG")
SELECT = re.compile(r"^ SELECT (?:(COUNT|MAX|MIN|SUM|AVG) )?(.+?) FROM ")
WHERE = re.compile(r" WHERE (.+?) = ")


def split_row(text: str) -> tuple:
    """(prompt through 'A:', ' SQL', [columns])."""
    prompt, answer = text.split("\nA:", 1)
    columns = prompt.split("\ncolumns: ", 1)[1].split("\n", 1)[0].split(", ")
    return prompt + "\nA:", answer, columns


def corrupt(answer: str, columns: list, rng: random.Random):
    """The answer with a wrong column or a wrong aggregate; None when neither applies."""
    match = SELECT.match(answer)
    if match is None:
        return None
    aggregate, column = match.group(1), match.group(2)
    rest = answer[match.end() :]
    where = WHERE.search(rest)
    others = [c for c in columns if c != column]
    wrong = (
        where.group(1)
        if where and where.group(1) != column
        else (rng.choice(others) if others else None)
    )
    if wrong is not None and rng.random() < 0.5:
        head = f" SELECT {aggregate + ' ' if aggregate else ''}{wrong} FROM "
    else:
        choice = rng.choice([a for a in AGGREGATES if a != aggregate])
        head = f" SELECT {choice} {column} FROM "
    return head + rest


def quoted(answer: str) -> str:
    """The answer with its SELECT column in backticks (the chosen style)."""
    match = SELECT.match(answer)
    aggregate, column = match.group(1), match.group(2)
    return f" SELECT {aggregate + ' ' if aggregate else ''}`{column}` FROM " + answer[match.end() :]


def pairs(source: str) -> list:
    rows = []
    for i, line in enumerate((SOURCE / f"{source}.jsonl").read_text().splitlines()):
        prompt, answer, columns = split_row(json.loads(line)["text"])
        rejected = corrupt(answer, columns, random.Random(f"{source}-{i}"))
        if rejected is not None and rejected != answer:
            rows.append({"prompt": prompt, "chosen": quoted(answer), "rejected": rejected})
    return rows


def write(name: str, rows: list) -> None:
    (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{name}: {len(rows)} pairs")


if __name__ == "__main__":
    train = pairs("train")
    held = set(random.Random(0).sample(range(len(train)), 100))
    write("train", [r for i, r in enumerate(train) if i not in held])
    write("valid", [r for i, r in enumerate(train) if i in held])
    write("test", pairs("valid"))
