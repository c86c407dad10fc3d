"""Prompt-lookup decoding against plain decoding: decode speed, drafts taken, identical output.

    python bench/prompt_lookup.py [--reps 2] [--max-new-tokens 200] [--lookup 3] [--model M]

Two prompt sets, each prompt a chat turn through the template, greedy:

    grounded   copy, quote, extract and edit tasks over a 300-1,000-token passage: novels from
               tests/data/corpus, and a function of fastinfer's own source
    open       open-ended questions with nothing to copy

Per prompt, plain and prompt-lookup runs alternate --reps times each (fastinfer/lookup_bench.py,
which `fastinfer bench --prompt-lookup N` runs on a smaller built-in set). Decode speed is
(tokens - 1) / (time after the first token): the prefill is the same either way. Prints each
prompt's speeds, the ratio, the drafts taken and whether the outputs are identical, then each
set's mean ratio.
"""
import argparse
import gzip
import inspect
from pathlib import Path

import fastinfer
from fastinfer.kernels import ops
from fastinfer.lookup_bench import measure, table

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus"


def passage(name: str, start: int, chars: int) -> str:
    text = gzip.open(CORPUS / f"{name}.txt.gz", "rt", encoding="utf-8").read()
    return " ".join(text[start:start + chars].split())


def prompts() -> dict[str, list[tuple[str, str]]]:
    pride, persuasion = passage("prideprejudice", 30000, 1600), passage("persuasion", 50000, 2400)
    sense = passage("sensesensibility", 70000, 3600)
    code = inspect.getsource(ops.rmsnorm.py_func)
    return {
        "grounded": [
            ("copy", f"Repeat this passage exactly, word for word:\n\n{pride}"),
            ("quote", f"Quote the first three sentences of this passage verbatim:\n\n{persuasion}"),
            ("extract", f"Copy out every sentence of this passage in which someone speaks:\n\n{sense}"),
            ("edit", f"Rewrite this Python function with a docstring added, the code unchanged:\n\n{code}"),
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
