"""Build the bundled GRPO prompt set from the bundled instruction set.

    python scripts/make_prompt_data.py          # rewrite the file
    python scripts/make_prompt_data.py --check  # exit 1 if it is out of date

``sloth_core/testing/data/tiny_prompts.jsonl`` holds one row per distinct question of
``tiny_instructions.jsonl`` that has a short answer (its one-sentence definitions left
out): ``{"prompt", "answer", "task"}``, where ``answer`` is what
``sloth_core.train.rewards:exact_match`` checks (a number, a city, a word) and ``task``
the kind of question (``number``, ``capital``, ``antonym``, ``reverse``, ``plural``,
``parity``), for rewards or metrics per task. The questions and answers are read as
``make_preference_data.py`` reads them for its pairs, so the two sets agree.

The prompts take turns at the two layouts of sloth_core/data/prompts.py: a string
(``"<question>\\nAnswer:"``, as the preference set's plain rows) and TRL's conversational
form (one user message). The order is shuffled with a fixed seed, so the file is the
same on every run.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

from make_preference_data import DATA, _answer, _answer_kind, _question, render

from sloth_core.testing.datasets import load_tiny_instructions

FILE = DATA / "tiny_prompts.jsonl"


def build() -> list[dict[str, Any]]:
    """The rows of the file."""
    rows, seen = [], set()
    for row in load_tiny_instructions():
        kind = _answer_kind(row)
        question = _question(row)
        if kind is None or question in seen:
            continue
        seen.add(question)
        prompt: Any = f"{question}\nAnswer:"
        if len(rows) % 2:
            prompt = [{"role": "user", "content": question}]
        rows.append({"prompt": prompt, "answer": _answer(row, kind), "task": kind})
    random.Random(19).shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the file is current")
    args = parser.parse_args(argv)
    text = render(build())
    if not args.check:
        FILE.write_text(text, encoding="utf-8")
        print(f"{FILE}: {text.count(chr(10))} rows")
    elif not FILE.is_file() or FILE.read_text(encoding="utf-8") != text:
        print(f"out of date: {FILE.name}; run {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
