"""Build the bundled preference data sets from the bundled instruction set.

    python scripts/make_preference_data.py          # rewrite the two files
    python scripts/make_preference_data.py --check  # exit 1 if they are out of date

``sloth_core/testing/data/tiny_preferences.jsonl`` holds DPO/ORPO/SimPO pairs and
``tiny_kto.jsonl`` KTO rows, both from ``tiny_instructions.jsonl`` (its one-sentence
definitions left out: their answers are long). The chosen completion is the right short
answer (a number, a city, a word: 1 to 8 tokens); the rejected one is wrong but
plausible, and ends with a full stop: an arithmetic answer off by a little, another row's
capital or antonym, the word not reversed, a regular plural of an irregular noun, the
other parity. Arithmetic rows get a second pair with another wrong number.

The full stop is the preference a tiny model learns within an epoch: every pair shares
it, where telling right from wrong takes each pair's own knowledge. Measured on the demo
model (LoRA r=32, lr 1e-3, batches of 8): DPO's reward accuracy stays near 0.6 for four
epochs without it and passes 0.95 within 16 steps with it; SimPO's (average log-probs,
no reference) starts near 0.1, as the likely full stop raises the rejected side's
average, and passes 0.95 within 16 steps, so a test of the reference-free losses sees
them learn rather than start right.

The rows take turns at the three layouts sloth reads (see sloth_core/data/preference.py):
plain strings, TRL's conversational form (prompt and completions as message lists) and
the implicit prompt (chosen and rejected whole conversations). Each KTO row is one side
of a pair, strings and conversations in turn, desirable when it is the chosen side. The
order is shuffled with a fixed seed, so the files are the same on every run.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

from sloth_core.testing.datasets import load_tiny_instructions

DATA = Path(__file__).resolve().parent.parent / "sloth_core" / "testing" / "data"
FILES = {"pairs": DATA / "tiny_preferences.jsonl", "kto": DATA / "tiny_kto.jsonl"}
_NUMBER = re.compile(r"-?\d+")


def _answer_kind(row: dict[str, str]) -> str | None:
    instruction = row["instruction"]
    if instruction.startswith("Define"):
        return None
    if " plus " in instruction or " minus " in instruction or instruction.startswith("Multiply"):
        return "number"
    if "capital" in instruction:
        return "capital"
    if "opposite" in instruction or "antonym" in instruction:
        return "antonym"
    if instruction.startswith("Reverse"):
        return "reverse"
    if "plural" in instruction:
        return "plural"
    if "even or odd" in instruction:
        return "parity"
    raise ValueError(f"no rule for the instruction {instruction!r}")


def _answer(row: dict[str, str], kind: str) -> str:
    output = row["output"].rstrip(".")
    if kind == "number":
        return _NUMBER.findall(output)[-1]
    if kind in ("capital", "antonym", "parity"):
        # "The capital of Japan is Tokyo", "The opposite of 'happy' is 'sad'", "Paris"
        return output.rsplit(" is ", 1)[-1].strip("'")
    return output


def _wrong(row: dict[str, str], kind: str, right: str, pool: list[str], rng: random.Random) -> str:
    if kind == "number":
        value = int(right)
        candidates = [value + delta for delta in (-2, -1, 1, 2, 10) if value + delta >= 0]
        return str(rng.choice(candidates))
    if kind == "parity":
        return "even" if right == "odd" else "odd"
    if kind == "reverse":
        return row["input"]
    if kind == "plural":
        word = row["input"]
        naive = word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")
        return naive if naive != right else word
    return rng.choice([other for other in pool if other != right])


def _question(row: dict[str, str]) -> str:
    return row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")


def _pair_row(question: str, chosen: str, rejected: str, layout: int) -> dict[str, Any]:
    if layout == 0:
        return {
            "prompt": f"{question}\nAnswer:",
            "chosen": f" {chosen}",
            "rejected": f" {rejected}",
        }
    user = [{"role": "user", "content": question}]
    if layout == 1:
        return {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    return {
        "chosen": [*user, {"role": "assistant", "content": chosen}],
        "rejected": [*user, {"role": "assistant", "content": rejected}],
    }


def _kto_row(question: str, completion: str, label: bool, layout: int) -> dict[str, Any]:
    if layout == 0:
        return {"prompt": f"{question}\nAnswer:", "completion": f" {completion}", "label": label}
    return {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": completion}],
        "label": label,
    }


def build() -> dict[str, list[dict[str, Any]]]:
    """The rows of both files."""
    rng = random.Random(18)
    rows, seen = [], set()
    for row in load_tiny_instructions():
        key = (row["instruction"], row["input"])
        kind = _answer_kind(row)
        if kind is not None and key not in seen:
            seen.add(key)
            rows.append((row, kind, _answer(row, kind)))
    pools: dict[str, list[str]] = {}
    for _, kind, right in rows:
        pools.setdefault(kind, []).append(right)
    triples = []
    for row, kind, right in rows:
        wrong = _wrong(row, kind, right, pools[kind], rng)
        triples.append((_question(row), right, f"{wrong}."))
        if kind == "number":
            again = _wrong(row, kind, right, pools[kind], rng)
            if again != wrong:
                triples.append((_question(row), right, f"{again}."))
    pairs = [_pair_row(*triple, layout=n % 3) for n, triple in enumerate(triples)]
    kto = []
    for n, (question, chosen, rejected) in enumerate(triples):
        kto.append(_kto_row(question, chosen, True, layout=n % 2))
        kto.append(_kto_row(question, rejected, False, layout=(n + 1) % 2))
    rng.shuffle(pairs)
    rng.shuffle(kto)
    return {"pairs": pairs, "kto": kto}


def render(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the files are current")
    args = parser.parse_args(argv)
    stale = []
    for kind, rows in build().items():
        text = render(rows)
        path = FILES[kind]
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"{path}: {len(rows)} rows")
    if stale:
        print(f"out of date: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
