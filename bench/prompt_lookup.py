"""Prompt-lookup decoding against plain decoding: decode speed, drafts taken, identical output.

    python bench/prompt_lookup.py [--reps 2] [--max-new-tokens 200] [--lookup 3] [--model M]

Two prompt sets, each prompt a chat turn through the template, greedy:

    grounded   copy, quote, extract and edit tasks over a 300-1,000-token passage: whole sentences
               of novels in tests/data/corpus, and a Python function in tests/data/code; the
               instruction comes before and after the passage
    open       open-ended questions with nothing to copy

Per prompt, plain and prompt-lookup runs alternate --reps times each (fastinfer/lookup_bench.py,
which `fastinfer bench --prompt-lookup N` runs on a smaller built-in set). Decode speed is
(tokens - 1) / (time after the first token): the prefill is the same either way. Prints each
prompt's share of output copied from it, the speeds, the ratio, the drafts taken and whether the
outputs are identical, then each set's mean ratio.
"""
import argparse
import gzip
import re
from pathlib import Path

import fastinfer
from fastinfer.lookup_bench import measure, table

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
SENTENCE_END = re.compile(r"[.!?][\"']?\s")


def passage(name: str, start: int, chars: int) -> str:
    """Whole sentences of a novel in tests/data/corpus: from the first sentence that begins after
    character `start` to the last that ends within `chars` of it (a passage cut mid-word is not
    what a user pastes, and the model treats it as a fragment to discuss, not text to copy)."""
    text = gzip.open(DATA / "corpus" / f"{name}.txt.gz", "rt", encoding="utf-8").read()
    text = " ".join(text[start:start + chars].split())
    first = SENTENCE_END.search(text).end()
    last = max(m.end() for m in SENTENCE_END.finditer(text))
    return text[first:last].strip()


def task(instruction: str, text: str) -> str:
    """The instruction, the text, and the instruction again: worded only before the text, the
    135M default model mostly comments on a passage instead of copying from it."""
    again = instruction.replace("this passage", "the passage above").replace("this Python function",
                                                                               "the Python function above")
    return f"{instruction}:\n\n{text}\n\n{again}."


def prompts() -> dict[str, list[tuple[str, str]]]:
    pride, persuasion = passage("prideprejudice", 30000, 1600), passage("persuasion", 50000, 2400)
    sense, pemberley = passage("sensesensibility", 70000, 2400), passage("prideprejudice", 60000, 3600)
    code = (DATA / "code" / "generate_batch.py.txt").read_text()
    return {
        "grounded": [
            ("copy", task("Repeat this passage exactly, word for word", pride)),
            ("quote", task("Quote the first three sentences of this passage verbatim", persuasion)),
            ("extract", task("Copy out every sentence of this passage in which someone speaks", sense)),
            ("edit", task("Rewrite this Python function with a comment on each line, the code unchanged", code)),
            ("copy long", task("Repeat this passage exactly, word for word", pemberley)),
        ],
        "open": [
            ("story", "Write a short story about a robot learning to paint."),
            ("sky", "Explain why the sky is blue."),
            ("advice", "Give advice to a new programmer."),
            ("heist", "Summarize the plot of a heist movie you invent."),
        ],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--lookup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = fastinfer.load(args.model, threads=args.threads)
    print(table(measure(model, prompts(), args.max_new_tokens, args.lookup, args.reps)))


if __name__ == "__main__":
    main()
