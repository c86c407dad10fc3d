"""How BlockSparse()'s setting is chosen: a quality screen of block patterns at one context length
on tuning passages, and a check on held-out ones.

Quality is the continuation protocol of bench/sparse_attention.py (fastinfer/evaluate.py): prefill
N tokens under the pattern, then score the next 256 true tokens one decode step each, as
generation feeds them, against dense, pooled over passages. The tuning passages choose the setting;
the held-out ones (the three texts bench/sparse_attention.py and docs/performance.md use) only check it.
Beside each setting: the mean number of keys a query of the prefill visits, which is what the
attention costs (dense: about N / 2). Speed is bench/sparse_attention.py's job.

    python bench/sparse_screen.py --corpus DIR              # tuning screen, 7936 + 256
    python bench/sparse_screen.py --corpus DIR --held-out

DIR holds persuasion.txt.gz, prideprejudice.txt.gz and sensesensibility.txt.gz (default: tests/data/corpus).
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np

import fastinfer
from fastinfer import BlockSparse
from fastinfer.evaluate import continuation
from fastinfer.perplexity import read_text

BOOKS = {"per": "persuasion.txt.gz", "pp": "prideprejudice.txt.gz", "ss": "sensesensibility.txt.gz"}
# Disjoint from the held-out passages (per 0, pp 10,000, ss 40,000, each 8,192 tokens long).
TUNING = [("per", 20000), ("per", 50000), ("per", 80000), ("per", 100000), ("pp", 30000), ("pp", 70000),
          ("pp", 110000), ("pp", 150000), ("ss", 60000), ("ss", 90000), ("ss", 120000), ("ss", 150000)]
HELD_OUT = [("per", 0), ("pp", 10000), ("ss", 40000)]

SETTINGS = {
    "b64 g1 w11": BlockSparse(local_blocks=11),
    "b64 g1 w9 (BlockSparse())": BlockSparse(),
    "b64 g1 w8": BlockSparse(local_blocks=8),
    "b64 g1 w7": BlockSparse(local_blocks=7),
    "b64 g2 w8": BlockSparse(global_blocks=2, local_blocks=8),
    "b64 g3 w7": BlockSparse(global_blocks=3, local_blocks=7),
    "b64 g1 w7 s32": BlockSparse(local_blocks=7, stride=32),
    "b64 g1 w5 s16": BlockSparse(local_blocks=5, stride=16),
}


def mean_keys(p: BlockSparse, n: int) -> float:
    """Keys a query visits under the pattern, averaged over positions 0..n-1 (causal)."""
    pos = np.arange(n)
    qb = pos // p.block
    seen = np.zeros(n)
    for d in range(int(qb.max()) + 1):
        kb = qb - d
        on = (kb >= 0) & ((kb < p.global_blocks) | (d <= p.local_blocks) | ((p.stride or 0) > 0 and d % (p.stride or 1) == 0))
        seen += np.where(on, np.where(d == 0, pos % p.block + 1, p.block), 0)
    return float(seen.mean())


def screen(model, corpus: Path, passages, n: int, settings: dict) -> None:
    ids = {b: model.encode(read_text(corpus / f)) for b, f in BOOKS.items()}
    texts = [ids[b][o:o + n + 256] for b, o in passages]
    t0 = time.perf_counter()
    dense = [continuation(model, t, n, steps=True).nll for t in texts]
    print(f"| dense | — | — | {n / 2:.0f} | {time.perf_counter() - t0:.0f} s |", flush=True)
    for label, p in settings.items():
        t0 = time.perf_counter()
        nll = [continuation(model, t, n, steps=True, attention=p).nll for t in texts]
        each = ", ".join(f"{math.exp(a - d) - 1:+.1%}" for a, d in zip(nll, dense))
        pooled = math.exp(np.mean(nll) - np.mean(dense)) - 1
        print(f"| {label} | {pooled:+.2%} | {each} | {mean_keys(p, n):.0f} | {time.perf_counter() - t0:.0f} s |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus",
                    help="folder with the three books (default: tests/data/corpus)")
    ap.add_argument("--held-out", action="store_true", help="the held-out passages instead of the tuning ones")
    ap.add_argument("--context", type=int, default=7936, help="tokens prefilled before the 256 scored (default 7936)")
    ap.add_argument("--settings", nargs="+", default=None, metavar="LABEL", choices=list(SETTINGS),
                    help="only these settings (labels as printed; default all)")
    args = ap.parse_args()
    settings = SETTINGS if args.settings is None else {k: SETTINGS[k] for k in args.settings}
    model = fastinfer.load(n_ctx=args.context + 256)
    passages = HELD_OUT if args.held_out else TUNING
    print(f"{args.context}-token contexts, {'held-out' if args.held_out else 'tuning'} passages {passages}\n")
    print("| setting | Δppl pooled | Δppl per passage | keys per query | time |\n|---|---:|---|---:|---:|")
    screen(model, args.corpus, passages, args.context, settings)


if __name__ == "__main__":
    main()
