"""Block-sparse attention against dense on SmolLM2: prefill speed and continuation perplexity.

    python bench/sparse_attention.py                     # 2048, 4096, 8192; 2 repetitions; 3 texts
    python bench/sparse_attention.py --contexts 2048 -r 1 --texts /path/to/book.txt:0

The continuation protocol of fastinfer/evaluate.py: prefill the first N tokens of a text (timed),
then score the next 256 true tokens, fed one decode step each as generation feeds them (--chunked:
in one call); dense and each pattern on the same tokens. The 8192 point
uses 7936 context + 256 scored tokens, so the total stays within SmolLM2's 8192 positions (the
model is loaded with n_ctx=8192).

Quality is pooled over several texts (FILE:OFFSET, the offset in tokens), because 256 tokens of one
text swing by several percent with the passage: Δppl = exp(mean NLL with the pattern - mean NLL
dense) over all scored tokens of all texts, and top-1 agreement likewise; the table also gives
Δppl per text. Speed is timed on the first text: the quality run's prefill, then further
repetitions alternating the settings (a short warm-up of every setting comes first and is not
counted); speedups are per repetition, mean ± std. At the longest context it also reports max |logit difference| between dense and a
pattern that covers every key (BlockSparse(block=64, global_blocks=0, local_blocks=N/64)).

Writes sparse-attention-<date>.md (table) and .png (speedup against perplexity change) into --out
(default bench/results).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import re
import time
from pathlib import Path

import numpy as np

import fastinfer
from fastinfer.evaluate import Comparison, continuation, plot, prefill_seconds
from fastinfer.perplexity import read_text

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus"  # public-domain novels, gzipped
TEXTS = [f"{CORPUS / 'persuasion.txt.gz'}:0", f"{CORPUS / 'prideprejudice.txt.gz'}:10000",
         f"{CORPUS / 'sensesensibility.txt.gz'}:40000"]
PATTERNS = [fastinfer.BlockSparse(),                              # b64 g1 w9 d1
            fastinfer.BlockSparse(local_blocks=7),
            fastinfer.BlockSparse(local_blocks=11),
            fastinfer.BlockSparse(local_blocks=19),
            fastinfer.BlockSparse(dense_last=0)]                    # the pattern on every token
N_NEXT = 256


def label(b: fastinfer.BlockSparse) -> str:
    return (f"b{b.block} g{b.global_blocks} w{b.local_blocks}" + (f" s{b.stride}" if b.stride else "")
            + f" d{b.dense_last}")


def parse_pattern(spec: str, ap: argparse.ArgumentParser) -> fastinfer.BlockSparse:
    """"g2w8" -> BlockSparse(global_blocks=2, local_blocks=8): b, g, w, s, d as in `label`."""
    parts = re.fullmatch(r"(?:b(\d+))?(?:g(\d+))?(?:w(\d+))?(?:s(\d+))?(?:d(\d+))?", spec.replace(" ", ""))
    if not parts or not spec:
        ap.error(f"--patterns: {spec!r} is not a pattern like g2w8 or b64g1w7s32d1")
    names = ("block", "global_blocks", "local_blocks", "stride", "dense_last")
    return fastinfer.BlockSparse(**{n: int(v) for n, v in zip(names, parts.groups()) if v is not None})


def _sd(a: np.ndarray) -> str:
    """" ± std" of repeated figures, nothing for one run."""
    return f" ± {a.std(ddof=1):.2f}" if len(a) > 1 else ""


def time_prefills(model, ids, context: int, settings, secs: dict, reps: range) -> None:
    """Append one prefill time per setting to secs[name] for each repetition in reps, settings
    alternating and their order flipped every other repetition."""
    for rep in reps:
        for name, att in (settings if rep % 2 == 0 else settings[::-1]):
            secs[name].append(prefill_seconds(model, ids, context, attention=att))
            print(f"{context} {name}: prefill {secs[name][-1]:.2f} s", flush=True)


def speed_only(model, ids, args, settings) -> None:
    """Prefill seconds of every setting, -r repetitions alternating (the order flips each time),
    per context; the speedup is the per-repetition dense/sparse ratio, mean ± std."""
    lines = []
    for ctx in args.contexts:
        context = min(ctx, model.n_ctx) - N_NEXT if ctx + N_NEXT > model.n_ctx else ctx
        secs = {name: [] for name, _ in settings}
        time_prefills(model, ids, context, settings, secs, range(args.repetitions))
        dense = np.array(secs["dense"])
        for name, _ in settings[1:]:
            mine = np.array(secs[name])
            ratio = dense / mine
            lines.append(f"| {context} | {name} | {dense.mean():.2f}{_sd(dense)} | {mine.mean():.2f}{_sd(mine)} | "
                         f"{ratio.mean():.2f}{_sd(ratio)}× | {ratio.min():.2f}-{ratio.max():.2f}× |")
            print(lines[-1], flush=True)
    date = _dt.date.today().isoformat()
    md = args.out / f"sparse-speed-{date}{'-' + args.tag if args.tag else ''}.md"
    head = (f"# Block-sparse prefill speed vs dense, {date}\n\nSmolLM2-135M-Instruct Q4_1 (auto dtype), "
            f"{args.threads} threads, {platform.machine()}, the default f16 KV cache. Prefill of the first N "
            f"tokens of {Path(args.texts[0]).name}, {args.repetitions} repetitions, settings alternating "
            f"(order flipped every repetition) after a warm-up; speedup = per-repetition dense/sparse "
            f"ratio, mean ± std and range.\n\n")
    table = ("| context | setting | prefill s (dense) | prefill s | speedup | range |\n"
             "|---:|---|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(head + table, encoding="utf-8")
    tmp.replace(md)
    print(f"wrote {md}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("-r", "--repetitions", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--texts", nargs="+", default=TEXTS, help="FILE:OFFSET (tokens); speed is timed on the first")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--local-blocks", type=int, nargs="+", default=None, metavar="W",
                    help="measure BlockSparse(local_blocks=W) for each W instead of the default set")
    ap.add_argument("--dense-last", type=int, nargs="+", default=None, metavar="N",
                    help="with --local-blocks: each W with each dense_last N (default: BlockSparse()'s)")
    ap.add_argument("--patterns", nargs="+", default=None, metavar="SPEC",
                    help="measure these patterns instead, each as its label's letters: g2w8, w9d1, b64g1w7s32 "
                         "(missing parts take BlockSparse()'s values)")
    ap.add_argument("--speed-only", action="store_true",
                    help="time the prefills only (-r alternating repetitions on the first text), no quality")
    ap.add_argument("--tag", default="", help="suffix for the output files' names")
    ap.add_argument("--chunked", action="store_true",
                    help="feed the scored tokens in one chunk (under the pattern, but for the last dense_last) "
                         "instead of one decode step each, as generation does")
    args = ap.parse_args()
    patterns = PATTERNS if args.local_blocks is None else [
        fastinfer.BlockSparse(local_blocks=w, dense_last=d)
        for w in args.local_blocks for d in (args.dense_last or [fastinfer.BlockSparse().dense_last])]
    if args.patterns:
        patterns = [parse_pattern(spec, ap) for spec in args.patterns]

    model = fastinfer.load(n_ctx=8192, threads=args.threads)
    texts = []
    for spec in args.texts:
        path, _, off = spec.rpartition(":")
        texts.append((Path(path).name, model.encode(read_text(path))[int(off):]))
    default = fastinfer.BlockSparse()
    settings = [("dense", None)] + [(label(b) + (" (default)" if b == default else ""), b)
                                    for b in dict.fromkeys(patterns)]
    for _, att in settings:  # warm-up: compiled kernels load, caches fault in
        continuation(model, texts[0][1], 256, 16, attention=att)

    if args.speed_only:
        speed_only(model, texts[0][1], args, settings)
        return
    rows, lines = [], []
    cover_note = ""
    for ctx in args.contexts:
        context = min(ctx, model.n_ctx) - N_NEXT if ctx + N_NEXT > model.n_ctx else ctx
        # quality: every setting on every text; the first text's prefills are the first timing
        runs = {name: [continuation(model, ids, context, N_NEXT, steps=not args.chunked, attention=att)
                       for _, ids in texts]
                for name, att in settings}
        secs = {name: [runs[name][0].prefill_seconds] for name, _ in settings}
        time_prefills(model, texts[0][1], context, settings, secs, range(1, args.repetitions))
        dense = np.array(secs["dense"])
        d_nll = np.mean([c.nll for c in runs["dense"]])
        for name, _ in settings[1:]:
            mine = np.array(secs[name])
            ratio = dense / mine
            nll = np.mean([c.nll for c in runs[name]])
            agree = float(np.mean([np.mean(a.top1 == b.top1) for a, b in zip(runs["dense"], runs[name])]))
            per_text = ", ".join(f"{math.exp(b.nll - a.nll) - 1:+.1%}" for a, b in zip(runs["dense"], runs[name]))
            rows.append(Comparison(name, context, float(dense.mean()), float(mine.mean()), math.exp(d_nll),
                                   math.exp(nll), agree))
            lines.append(f"| {context} | {name} | {dense.mean():.2f}{_sd(dense)} | {mine.mean():.2f}{_sd(mine)} | "
                         f"{ratio.mean():.2f}{_sd(ratio)}× | {math.exp(d_nll):.3f} | {math.exp(nll):.3f} | "
                         f"{math.exp(nll - d_nll) - 1:+.1%} | {per_text} | {agree:.1%} |")
            print(lines[-1], flush=True)
        if ctx == max(args.contexts):  # a pattern covering every key: the same logits as dense
            ids = texts[0][1]
            cover = fastinfer.BlockSparse(block=64, global_blocks=0, local_blocks=-(-(context + N_NEXT) // 64),
                                          dense_last=0)  # the pattern alone (see tests/test_attention.py)
            logits = []
            for att in (None, cover):
                s = model.session(n_ctx=context + N_NEXT, attention=att)
                last = s.prefill(ids[:context])
                rest = (s.append(ids[context:context + N_NEXT - 1]) if args.chunked else
                        np.array([s.decode_step(t).copy() for t in ids[context:context + N_NEXT - 1]]))
                logits.append(np.concatenate([last[None], rest]))
            diff = float(np.abs(logits[0] - logits[1]).max())
            cover_note = (f"A pattern covering every key ({label(cover)}) against dense at {context} context: "
                          f"max |logit difference| over the {N_NEXT} scored positions = {diff:.2e}.")
            print(cover_note, flush=True)

    date = _dt.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"sparse-attention-{date}{'-' + args.tag if args.tag else ''}"
    md = args.out / f"{stem}.md"
    names = ", ".join(f"{n} from token {spec.rpartition(':')[2]}" for (n, _), spec in zip(texts, args.texts))
    head = (f"# Block-sparse attention vs dense, {date}\n\n"
            f"SmolLM2-135M-Instruct Q4_1 (auto dtype), {args.threads} threads, {platform.machine()}. Texts: "
            f"{names}; N tokens of each as context, the next {N_NEXT} scored (continuation protocol, "
            f"fastinfer/evaluate.py). 8192 = 7936 context + {N_NEXT} scored (the model's 8192 positions). "
            f"Δppl and top-1 agreement pooled over the texts' {N_NEXT * len(texts)} scored tokens; Δppl per "
            f"text in text order. Prefill seconds on the first text, mean ± std over {args.repetitions} "
            f"repetitions, settings alternating; speedup = per-repetition dense/sparse ratio. Settings: "
            f"b = block tokens, g = global (sink) blocks, w = local blocks before the query's own, s = stride, "
            f"d = dense_last (the last d tokens of each call attend densely). The scored tokens are fed "
            f"{'in one chunk' if args.chunked else 'one decode step each, as generation does'}.\n\n")
    table = ("| context | setting | prefill s (dense) | prefill s | speedup | ppl (dense) | ppl | Δppl | "
             "Δppl per text | top-1 agree |\n|---:|---|---:|---:|---:|---:|---:|---:|---|---:|\n"
             + "\n".join(lines) + "\n")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(head + table + "\n" + cover_note + "\n", encoding="utf-8")
    tmp.replace(md)
    plot(rows, args.out / f"{stem}.png", "SmolLM2: block-sparse attention vs dense")
    print(f"wrote {md}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"took {time.perf_counter() - t0:.0f} s")
