"""What block-sparse attention costs in quality, over many windows of varied text.

    python bench/sparse_quality.py --texts novel.txt.gz docs.txt code.py -w 3 --patterns g1w9 g1w17
    python bench/sparse_quality.py --texts ... --context 8064 --next 128 --out bench/results --tag xeon

For every text, -w windows at evenly spaced offsets: prefill `context` tokens, then score the next
`next` true tokens one decode step each (as generation feeds them), dense and under each pattern
on the same tokens. Reports Δppl = exp(mean NLL with the pattern - mean NLL dense) per window, per
text and pooled over all scored tokens, with the smallest and largest window. Patterns are written
as bench/sparse_attention.py takes them (g1w9 = BlockSparse(global_blocks=1, local_blocks=9));
BlockSparse()'s other fields keep their defaults. Files may be gzipped; the model is SmolLM2 (the
default) unless -m says otherwise.
"""
import argparse
import datetime as _dt
import math
import platform
import re
from pathlib import Path

import numpy as np

import fastinfer
from fastinfer import BlockSparse
from fastinfer.evaluate import continuation
from fastinfer.kernels import isa
from fastinfer.perplexity import read_text


def pattern(spec: str) -> BlockSparse:
    fields = {"b": "block", "g": "global_blocks", "w": "local_blocks", "s": "stride", "d": "dense_last"}
    parts = re.findall(r"([bgwsd])(\d+)", spec)
    if not parts or "".join(k + v for k, v in parts) != spec:
        raise SystemExit(f"bad pattern {spec!r}: letters b, g, w, s, d each followed by a number")
    return BlockSparse(**{fields[k]: int(v) for k, v in parts})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", nargs="+", required=True, help="text files (gzip is unpacked)")
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--context", type=int, default=8064)
    ap.add_argument("--next", type=int, default=128)
    ap.add_argument("-w", "--windows", type=int, default=3, help="windows per text")
    ap.add_argument("--patterns", nargs="+", default=["g1w9"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here as sparse-quality-<date>[-tag].md")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    need = args.context + args.next
    model = fastinfer.load(args.model, threads=args.threads, n_ctx=need)
    patterns = {p: pattern(p) for p in args.patterns}
    rows = []  # (text, offset, dense nll, {pattern: nll})
    for path in args.texts:
        ids = model.encode(read_text(path))
        if len(ids) < need:
            print(f"{path}: {len(ids)} tokens, fewer than {need}: skipped")
            continue
        span = len(ids) - need
        offsets = [0] if args.windows == 1 else [round(k * span / (args.windows - 1)) for k in range(args.windows)]
        for off in offsets:
            window = ids[off:off + need]
            dense = continuation(model, window, args.context, args.next, steps=True)
            nll = {p: continuation(model, window, args.context, args.next, steps=True, attention=bs).nll
                   for p, bs in patterns.items()}
            rows.append((Path(path).name, off, dense.nll, nll))
            print(f"{Path(path).name} @{off}: dense ppl {math.exp(dense.nll):.2f}; "
                  + ", ".join(f"{p} {100 * (math.exp(v - dense.nll) - 1):+.1f}%" for p, v in nll.items()), flush=True)

    lines = [f"# Block-sparse attention: quality over varied text ({_dt.date.today()})", "",
             f"{isa.cpu_model()} ({isa.TIER.name}), {platform.python_version()}; model "
             f"{args.model or 'SmolLM2-135M-Instruct Q4_1'}; context {args.context}, the next {args.next} tokens "
             f"scored one decode step each; {args.windows} evenly spaced windows per text.", "",
             "Δppl = exp(mean NLL with the pattern - mean NLL dense): per text (its windows pooled), then over all "
             "texts; in brackets the smallest and largest single window.", "",
             "| text | windows | dense ppl | " + " | ".join(f"{p} Δppl" for p in patterns) + " |",
             "|---|---:|---:|" + "---:|" * len(patterns)]
    texts = list(dict.fromkeys(r[0] for r in rows))

    def cell(sel, p):
        d = np.array([r[2] for r in sel])
        a = np.array([r[3][p] for r in sel])
        per = np.exp(a - d) - 1
        return f"{100 * (math.exp(a.mean() - d.mean()) - 1):+.1f}% [{100 * per.min():+.1f}, {100 * per.max():+.1f}]"

    for t in texts + ["all texts"]:
        sel = rows if t == "all texts" else [r for r in rows if r[0] == t]
        dense_ppl = math.exp(np.mean([r[2] for r in sel]))
        lines.append(f"| {t} | {len(sel)} | {dense_ppl:.2f} | " + " | ".join(cell(sel, p) for p in patterns) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        name = f"sparse-quality-{_dt.date.today()}{'-' + args.tag if args.tag else ''}.md"
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = args.out / (name + ".tmp")
        tmp.write_text(table)
        tmp.replace(args.out / name)


if __name__ == "__main__":
    main()
