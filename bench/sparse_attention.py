"""Block-sparse attention against dense on SmolLM2: prefill speed and continuation perplexity.

    python bench/sparse_attention.py                     # 2048, 4096, 8192; 3 repetitions
    python bench/sparse_attention.py --contexts 2048 -r 2 --text /path/to/book.txt

The continuation protocol of fastinfer/evaluate.py: prefill the first N tokens of a text (timed),
then score the next 256 true tokens; dense and each pattern on the same tokens. The 8192 point
uses 7936 context + 256 scored tokens, so the total stays within SmolLM2's 8192 positions (the
model is loaded with n_ctx=8192). Repetitions alternate the settings (repetition 0 is a warm-up at
a short context and is not counted); speedups are per repetition, mean ± std. Perplexity and
top-1 agreement are deterministic and come from the first repetition (later ones are checked to
match). At the longest context it also reports max |logit difference| between dense and a
pattern that covers every key (BlockSparse(block=64, global_blocks=0, local_blocks=N/64)).

Writes sparse-attention-<date>.md (table) and .png (speedup against perplexity change) into --out
(default bench/results).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import time
from pathlib import Path

import numpy as np

import fastinfer
from fastinfer.evaluate import Comparison, compare, continuation, plot

TEXT = Path("/work/shared/corpus/persuasion.txt")
PATTERNS = [fastinfer.BlockSparse(block=64, global_blocks=1, local_blocks=15),
            fastinfer.BlockSparse(block=64, global_blocks=1, local_blocks=31)]
N_NEXT = 256


def label(b: fastinfer.BlockSparse) -> str:
    return f"b{b.block} g{b.global_blocks} w{b.local_blocks}" + (f" s{b.stride}" if b.stride else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    model = fastinfer.load(n_ctx=8192, threads=args.threads)
    ids = model.encode(args.text.read_text(encoding="utf-8"))
    settings = [("dense", None)] + [(label(b), b) for b in PATTERNS]
    # warm-up: every setting once at a short context (compiled kernels load, caches fault in)
    for _, att in settings:
        continuation(model, ids, 256, 16, attention=att)

    rows, lines = [], []
    cover_note = ""
    for ctx in args.contexts:
        context = min(ctx, model.n_ctx) - N_NEXT if ctx + N_NEXT > model.n_ctx else ctx
        secs = {name: [] for name, _ in settings}
        first = {}
        for rep in range(args.repetitions):
            order = settings if rep % 2 == 0 else settings[::-1]  # alternate, and flip the order
            for name, att in order:
                c = continuation(model, ids, context, N_NEXT, attention=att)
                secs[name].append(c.prefill_seconds)
                if name in first:
                    assert abs(first[name].nll - c.nll) < 1e-6, "continuation is not deterministic"
                else:
                    first[name] = c
                print(f"{context} {name}: prefill {c.prefill_seconds:.2f} s, ppl {c.ppl:.3f}", flush=True)
        dense = np.array(secs["dense"])
        for name, _ in settings[1:]:
            mine = np.array(secs[name])
            ratio = dense / mine
            cmp = compare(name, first["dense"], first[name])
            rows.append(Comparison(name, context, float(dense.mean()), float(mine.mean()), cmp.dense_ppl, cmp.ppl,
                                   cmp.top1_agreement))
            sd = (lambda a: f" ± {a.std(ddof=1):.2f}" if len(a) > 1 else "")  # noqa: E731  (one run: no std)
            lines.append(f"| {context} | {name} | {dense.mean():.2f}{sd(dense)} | "
                         f"{mine.mean():.2f}{sd(mine)} | {ratio.mean():.2f}{sd(ratio)}× | "
                         f"{cmp.dense_ppl:.3f} | {cmp.ppl:.3f} | {cmp.ppl_change:+.1%} | {cmp.top1_agreement:.1%} |")
            print(lines[-1], flush=True)
        if ctx == max(args.contexts):  # a pattern covering every key: the same logits as dense
            cover = fastinfer.BlockSparse(block=64, global_blocks=0, local_blocks=-(-(context + N_NEXT) // 64))
            logits = []
            for att in (None, cover):
                s = model.session(n_ctx=context + N_NEXT, attention=att)
                last = s.prefill(ids[:context])
                logits.append(np.concatenate([last[None], s.append(ids[context:context + N_NEXT - 1])]))
            diff = float(np.abs(logits[0] - logits[1]).max())
            cover_note = (f"A pattern covering every key ({label(cover)}) against dense at {context} context: "
                          f"max |logit difference| over the {N_NEXT} scored positions = {diff:.2e}.")
            print(cover_note, flush=True)

    date = _dt.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    md = args.out / f"sparse-attention-{date}.md"
    head = (f"# Block-sparse attention vs dense, {date}\n\n"
            f"SmolLM2-135M-Instruct Q4_1 (auto dtype), {args.threads} threads, {platform.machine()}; text: "
            f"{args.text.name}, first N tokens as context, next {N_NEXT} scored (continuation protocol, "
            f"fastinfer/evaluate.py). 8192 = 7936 context + {N_NEXT} scored (the model's 8192 positions). "
            f"Prefill seconds mean ± std over {args.repetitions} repetitions, settings alternating; speedup "
            f"= per-repetition dense/sparse ratio. Settings: b = block tokens, g = global (sink) blocks, "
            f"w = local blocks before the query's own, s = stride.\n\n")
    table = ("| context | setting | prefill s (dense) | prefill s | speedup | ppl (dense) | ppl | Δppl | top-1 agree |\n"
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(head + table + "\n" + cover_note + "\n", encoding="utf-8")
    tmp.replace(md)
    plot(rows, args.out / f"sparse-attention-{date}.png", "SmolLM2: block-sparse attention vs dense")
    print(f"wrote {md}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"took {time.perf_counter() - t0:.0f} s")
