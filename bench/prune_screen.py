"""How Prune()'s setting was chosen: a quality screen on tuning passages, a check on held-out ones,
and a pass-key recall test.

Quality is the continuation protocol of `fastinfer eval-prune` (fastinfer/evaluate.py): prefill
N tokens, score the next 256 true tokens, pruned against dense, pooled over passages. The tuning
passages choose the setting; the held-out ones (the three `eval-prune` uses in docs/performance.md,
and three more) only check it. The pass-key test hides a 5-digit key at evenly spaced depths in
filler text and asks for it back (greedy): it shows what pruning does to recall from the middle of
a prompt, which perplexity does not see. Speed is `eval-prune`'s job.

    python bench/prune_screen.py --corpus DIR              # tuning screen, 2048 tokens
    python bench/prune_screen.py --corpus DIR --held-out   # the held-out check
    python bench/prune_screen.py --passkey

DIR holds persuasion.txt.gz, prideprejudice.txt.gz and sensesensibility.txt.gz (default: tests/data/corpus).
"""
import argparse
import math
import random
import time
from pathlib import Path

import numpy as np

import fastinfer
from fastinfer import Prune
from fastinfer.evaluate import continuation
from fastinfer.perplexity import read_text

BOOKS = {"per": "persuasion.txt.gz", "pp": "prideprejudice.txt.gz", "ss": "sensesensibility.txt.gz"}
TUNING = [("per", 40000), ("per", 55000), ("per", 70000), ("per", 85000), ("pp", 40000), ("pp", 60000),
          ("pp", 90000), ("pp", 110000), ("ss", 40000), ("ss", 60000), ("ss", 100000), ("ss", 120000)]
HELD_OUT = [("per", 20000), ("pp", 20000), ("ss", 20000), ("per", 95000), ("pp", 140000), ("ss", 145000)]

SETTINGS = {  # label -> Prune; "recent" with keep_last covering the budget is the same as score="recent"
    "attention 0.5 from 2, sinks 4, last 256 (old Prune())": Prune(0.5, 2, "attention", 4, 256),
    "attention 0.5 from 2, sinks 4, last 512": Prune(0.5, 2, "attention", 4, 512),
    "attention 0.5 from 2, sinks 32, last 512": Prune(0.5, 2, "attention", 32, 512),
    "attention 0.5 from 2, sinks 32, last 736": Prune(0.5, 2, "attention", 32, 736),
    "norm 0.5 from 2, sinks 32, last 736": Prune(0.5, 2, "norm", 32, 736),
    "recent 0.5 from 2, sinks 32": Prune(0.5, 2, "recent", 32),
    "recent 0.5 from 2, sinks 64": Prune(0.5, 2, "recent", 64),
    "recent 0.45 from 1, sinks 64": Prune(0.45, 1, "recent", 64),
    "recent 0.5 from 1, sinks 64 (Prune())": Prune(),
    "recent 0.5 from 1, sinks 128": Prune(0.5, 1, "recent", 128),
    "recent 0.55 from 1, sinks 64": Prune(0.55, 1, "recent", 64),
    "recent 0.4 from 1, sinks 64": Prune(0.4, 1, "recent", 64),
    "recent 0.4 from 2, sinks 64": Prune(0.4, 2, "recent", 64),
    "recent 0.35 from 4, sinks 64": Prune(0.35, 4, "recent", 64),
    "norm 0.45 from 1, sinks 64, last 256": Prune(0.45, 1, "norm", 64, 256),
    "attention 0.45 from 1, sinks 64, last 256": Prune(0.45, 1, "attention", 64, 256),
}


def screen(model, corpus: Path, passages, n: int, settings: dict) -> None:
    ids = {b: model.tokenizer.encode(read_text(corpus / f), add_special_tokens=False).ids
           for b, f in BOOKS.items()}
    texts = [ids[b][o:o + n + 256] for b, o in passages]
    dense = [continuation(model, t, n).nll for t in texts]
    for label, p in settings.items():
        t0 = time.perf_counter()
        nll = [continuation(model, t, n, prune=p).nll for t in texts]
        each = ", ".join(f"{math.exp(a - d) - 1:+.1%}" for a, d in zip(nll, dense))
        pooled = math.exp(np.mean(nll) - np.mean(dense)) - 1
        print(f"| {label} | {pooled:+.2%} | {each} | {time.perf_counter() - t0:.0f} s |", flush=True)


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(model, n_tokens: int, depth: float, key: int) -> str:
    head = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    reps = (n_tokens - len(model.encode(head + needle + tail))) // len(model.encode(FILLER))
    k = int(reps * depth)
    return head + FILLER * k + needle + FILLER * (reps - k) + tail


def passkey(model, n: int, trials: int, settings: dict) -> None:
    rng = random.Random(0)
    cases = [(rng.randint(10000, 99999), (i + 0.5) / trials) for i in range(trials)]
    for label, p in {"dense": None, **settings}.items():
        hits = [str(key) in model.generate(passkey_prompt(model, n, depth, key), max_new_tokens=7, prune=p)
                for key, depth in cases]
        print(f"| {label} | {sum(hits)}/{trials} | {''.join('x' if h else '.' for h in hits)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus",
                    help="folder with the three books (default: tests/data/corpus)")
    ap.add_argument("--held-out", action="store_true", help="the held-out passages instead of the tuning ones")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--passkey", action="store_true", help="the pass-key recall test instead")
    ap.add_argument("--trials", type=int, default=10, help="pass-key depths (default 10)")
    args = ap.parse_args()
    model = fastinfer.load(n_ctx=args.context + 256)
    if args.passkey:
        print(f"pass key in {args.context} tokens, depths (i + 0.5) / {args.trials} (x = recalled)\n")
        print("| setting | recalled | by depth |\n|---|---:|---|")
        passkey(model, args.context, args.trials, SETTINGS)
        return
    passages = HELD_OUT if args.held_out else TUNING
    print(f"{args.context}-token contexts, {'held-out' if args.held_out else 'tuning'} passages {passages}\n")
    print("| setting | Δppl pooled | Δppl per passage | time |\n|---|---:|---|---:|")
    screen(model, args.corpus, passages, args.context, SETTINGS)


if __name__ == "__main__":
    main()
