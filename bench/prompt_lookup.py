"""Prompt-lookup decoding against plain decoding: decode speed, drafts taken, identical output.

    python bench/prompt_lookup.py [--reps 2] [--max-new-tokens 200] [--lookup 3] [--model M]

Two prompt sets, each prompt a chat turn through the template, greedy:

    grounded   copy, quote, extract and edit tasks over a 300-1,000-token passage: novels from
               tests/data/corpus, and a function of fastinfer's own source
    open       open-ended questions with nothing to copy

Per prompt, plain and prompt-lookup runs alternate --reps times each (fresh sessions). Decode
speed is (tokens - 1) / (time after the first token): the prefill is the same either way. Prints
each prompt's speeds, the ratio, the drafts taken and whether the outputs are identical, then each
set's mean ratio.
"""
import argparse
import gzip
import inspect
import statistics
import time
from pathlib import Path

import fastinfer
from fastinfer.generate import PromptLookup, generate_ids
from fastinfer.kernels import ops

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


def run(model, ids: list[int], n: int, lookup: int) -> tuple[list[int], float, PromptLookup | None]:
    """(tokens, decode seconds after the first token, the lookup's counts)."""
    s = model.session(n_ctx=min(model.n_ctx, len(ids) + n + 8))
    lk = PromptLookup(lookup) if lookup else None
    params = model._resolve(len(ids), max_new_tokens=n, temperature=0).sampling
    out, t1 = [], None
    for tok in generate_ids(s, ids, n, params, model.eos_ids, lookup=lk):
        out.append(tok)
        if t1 is None:
            t1 = time.perf_counter()
    return out, time.perf_counter() - t1, lk


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--lookup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = fastinfer.load(args.model, threads=args.threads)
    run(model, model.encode("Hello there"), 8, args.lookup)  # warm-up
    print("| set | prompt | prompt tokens | plain tok/s | lookup tok/s | ratio | drafts taken | identical |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    ratios: dict[str, list[float]] = {}
    for group, items in prompts().items():
        for name, content in items:
            ids = model.tokenizer.encode(model.apply_chat_template([{"role": "user", "content": content}]),
                                         add_special_tokens=False).ids
            plain, fast, same, lk = [], [], True, None
            for _ in range(args.reps):
                a, ta, _ = run(model, ids, args.max_new_tokens, 0)
                b, tb, lk = run(model, ids, args.max_new_tokens, args.lookup)
                plain.append((len(a) - 1) / ta)
                fast.append((len(b) - 1) / tb)
                same = same and a == b
            r = statistics.mean(fast) / statistics.mean(plain)
            ratios.setdefault(group, []).append(r)
            print(f"| {group} | {name} | {len(ids)} | {statistics.mean(plain):.1f} | {statistics.mean(fast):.1f} "
                  f"| {r:.2f}x | {lk.accepted}/{lk.drafted} | {'yes' if same else 'NO'} |", flush=True)
    for group, rs in ratios.items():
        print(f"{group}: mean ratio {statistics.mean(rs):.2f}x (min {min(rs):.2f}, max {max(rs):.2f})")


if __name__ == "__main__":
    main()
