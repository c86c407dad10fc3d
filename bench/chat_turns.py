"""Time to first token of a chat turn after a long history: the kept cache against a re-prefill.

    python bench/chat_turns.py [--history 1000] [--runs 5] [--model M] [--threads 2]

The history is one user turn holding a passage of Pride and Prejudice (tests/data/corpus) of
about --history tokens, and the model's reply to it. Then, alternating, --runs times each:

    cached   the next turn on the same `Conversation` (fastinfer chat): it prefills its own tokens
    whole    the same turn on a fresh Conversation that holds the same messages: it prefills all
    own      a fresh session prefilling only as many tokens as `cached` did (the floor)

Greedy, 8-bit activations (the default); mean ± std in milliseconds.
"""
import argparse
import gzip
import statistics
import time
from pathlib import Path

import fastinfer
from fastinfer.chat import Conversation

QUESTION = "Name the capital of France."
CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus" / "prideprejudice.txt.gz"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--history", type=int, default=1000, help="tokens of the passage in the first turn")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = fastinfer.load(args.model, threads=args.threads, n_ctx=4096)
    text = gzip.open(CORPUS, "rt", encoding="utf-8").read()[20000:]
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids[:args.history]
    first = "Here is a passage of a novel:\n\n" + model.decode(ids) + "\n\nWho speaks first in it?"
    opts = dict(temperature=0, max_new_tokens=24)

    def cached():
        c = Conversation(model, **opts)
        "".join(c.say(first))
        "".join(c.say(QUESTION))
        return c.last

    def whole(messages):
        c = Conversation(model, **opts)
        c.messages = [dict(m) for m in messages]
        "".join(c.say(QUESTION))
        return c.last

    def own(n):
        s = model.session(n_ctx=4096)
        t0 = time.perf_counter()
        s.prefill(ids[:n])
        return time.perf_counter() - t0

    warm = Conversation(model, **opts)
    "".join(warm.say(first))
    history = list(warm.messages)
    cached(), whole(history), own(16)  # warm-up
    times = {"cached": [], "whole": [], "own": []}
    for _ in range(args.runs):
        t = cached()
        times["cached"].append(t.first_token_seconds)
        n = t.prefilled
        times["whole"].append(whole(history).first_token_seconds)
        times["own"].append(own(n))
    print(f"history {t.prompt_tokens - t.prefilled} tokens cached; the turn prefills {n} of {t.prompt_tokens} "
          f"(whole: all {whole(history).prefilled})")
    for k, v in times.items():
        print(f"{k:7s} {1e3 * statistics.mean(v):8.1f} ± {1e3 * statistics.stdev(v):.1f} ms")


if __name__ == "__main__":
    main()
