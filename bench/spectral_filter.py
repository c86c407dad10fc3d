"""The spectral filter on SmolLM2-135M: what it costs in quality and time, and what it saves.

Continuation protocol (fastinfer/evaluate.py): prefill N tokens of a public-domain novel (timed),
score the next 256 true tokens, dense against filtered. Timing is mean ± std over --reps
repetitions with dense and every setting alternating (the first pass is a warm-up); perplexity
and top-1 agreement are deterministic. Decode speed: --decode tokens one at a time after a
16-token prompt, same alternation.

    python bench/spectral_filter.py [--contexts 512] [--reps 2]
        -> bench/results/spectral-<date>.md and .png
    python bench/spectral_filter.py --cost [--reps 8]
        -> the filter kernel's own cost and paired prefill timings, appended to that file
"""
import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

import fastinfer
from fastinfer.evaluate import Continuation, compare, continuation, markdown_table, plot
from fastinfer.perplexity import read_text

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # label -> session options
    "keep 0.99, all layers": dict(spectral_keep=0.99),
    "keep 0.95, all layers": dict(spectral_keep=0.95),
    "keep 0.9, all layers": dict(spectral_keep=0.9),
    "keep 0.75, all layers": dict(spectral_keep=0.75),
    "keep 0.5, all layers": dict(spectral_keep=0.5),
    "keep 0.5, last 4 layers": dict(spectral_keep=0.5, spectral_layers=[26, 27, 28, 29]),
    "keep 0.9, last layer": dict(spectral_keep=0.9, spectral_layers=[29]),
}


def _decode_seconds(model, n: int, **opts) -> float:
    s = model.session(n_ctx=16 + n, **opts)
    s.prefill(list(range(100, 116)))
    tok = 0
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(s.decode_step(tok)))
    return time.perf_counter() - t0


def _stats(xs) -> str:
    return f"{np.mean(xs):.2f} ± {np.std(xs, ddof=1):.2f}"


def cost(reps: int, threads: int) -> list[str]:
    """The filter kernel alone (keep half the bins of SmolLM2's 576-wide rows), and 128-token
    prefills dense and with keep 0.5 on all 30 layers, paired and alternating."""
    from fastinfer.kernels import spectral
    lines = ["", "## The filter's own cost", ""]
    h = 576 // 2 + 1
    tables = spectral.dft_tables(576)
    for T in (1, 64):
        x = np.random.default_rng(0).standard_normal((T, 576)).astype(np.float32)
        spec, mags = np.zeros((2, h)), np.zeros((2, h))
        spectral.spectral_filter_(x, h // 2, tables, spec, mags)
        us = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(200):
                spectral.spectral_filter_(x, h // 2, tables, spec, mags)
            us.append((time.perf_counter() - t0) / 200 * 1e6)
        lines.append(f"- one call on {T} × 576 (one layer): {_stats(us)} µs")
    model = fastinfer.load(threads=threads, n_ctx=128)

    def prefill_ms(**opts):
        s = model.session(n_ctx=128, **opts)
        t0 = time.perf_counter()
        s.prefill(list(range(100, 228)))
        return (time.perf_counter() - t0) / 128 * 1e3
    prefill_ms(), prefill_ms(spectral_keep=0.5)
    dense, filt = [], []
    for _ in range(reps):
        dense.append(prefill_ms())
        filt.append(prefill_ms(spectral_keep=0.5))
    lines += [f"- 128-token prefill, ms per token: dense {_stats(dense)}, keep 0.5 on all layers {_stats(filt)}; "
              f"paired ratio {_stats(np.array(filt) / np.array(dense))}",
              f"- load average at the end {os.getloadavg()[0]:.1f}"]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=str(ROOT / "tests/data/corpus/persuasion.txt.gz"))
    ap.add_argument("--cost", action="store_true", help="only the filter's own cost, appended to the results")
    a = ap.parse_args(argv)
    if a.cost:
        out = ROOT / "bench" / "results" / f"spectral-{datetime.date.today().isoformat()}.md"
        text = (out.read_text() if out.exists() else "") + "\n".join(cost(max(a.reps, 2), a.threads)) + "\n"
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
        print(text)
        return 0
    model = fastinfer.load(threads=a.threads, n_ctx=max(a.contexts) + 256)
    ids = model.tokenizer.encode(read_text(a.text), add_special_tokens=False).ids
    ids = ids[2000:]  # skip the front matter
    labels = ["dense", *SETTINGS]
    opts = {"dense": {}, **SETTINGS}
    rows, timing = [], []
    for n in a.contexts:
        prefill = {k: [] for k in labels}
        runs: dict[str, Continuation] = {}
        for rep in range(a.reps + 1):
            for k in labels:
                c = continuation(model, ids, n, **opts[k])
                runs[k] = c
                if rep:
                    prefill[k].append(c.prefill_seconds)
        d = runs["dense"]
        for k in SETTINGS:
            c = runs[k]
            # the table's seconds are the means over repetitions
            mean = lambda xs: float(np.mean(xs))  # noqa: E731
            rows.append(compare(k, Continuation(n, mean(prefill["dense"]), d.nll, d.top1),
                                Continuation(n, mean(prefill[k]), c.nll, c.top1)))
        timing.append((n, {k: (np.mean(v), np.std(v, ddof=1)) for k, v in prefill.items()}))
        print(markdown_table(rows[-len(SETTINGS):]), flush=True)
    dec = {k: [] for k in labels}
    for rep in range(a.reps + 1):
        for k in labels:
            s = _decode_seconds(model, a.decode, **opts[k])
            if rep:
                dec[k].append(a.decode / s)
    date = datetime.date.today().isoformat()
    h = model.args.dim // 2 + 1
    scratch = 64 * h * 8 + 2 * h * 4
    lines = [f"# Spectral filter on SmolLM2-135M-Instruct (Q4_1 GGUF, {a.threads} threads, {date})", "",
             f"Text: {Path(a.text).name} from token 2000; continuation protocol (prefill N, score the next 256). "
             f"Load average at the end {os.getloadavg()[0]:.1f} (shared machine). Prefill seconds are means over "
             f"{a.reps} alternating repetitions.", "", markdown_table(rows),
             "## Prefill time, mean ± std (s)", "", "| context | " + " | ".join(labels) + " |",
             "|---:|" + "---:|" * len(labels)]
    for n, t in timing:
        lines.append(f"| {n} | " + " | ".join(f"{t[k][0]:.3f} ± {t[k][1]:.3f}" for k in labels) + " |")
    lines += ["", f"## Decode speed, {a.decode} tokens after a 16-token prompt (tokens/s, mean ± std)", "",
              "| " + " | ".join(labels) + " |", "|" + "---:|" * len(labels),
              "| " + " | ".join(f"{np.mean(dec[k]):.1f} ± {np.std(dec[k], ddof=1):.1f}" for k in labels) + " |", "",
              "## Memory", "",
              f"The filter keeps the weights and the KV cache as they are (every hidden state is still dim = "
              f"{model.args.dim} floats after the inverse transform) and adds {scratch / 1024:.0f} KiB of scratch "
              f"per session (a complex64 spectrum for a 64-token chunk and two magnitude rows). It saves no memory."]
    out = ROOT / "bench" / "results" / f"spectral-{date}.md"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    try:
        plot(rows, out.with_suffix(".png"), "Spectral filter, SmolLM2-135M: speed vs quality")
    except RuntimeError as e:
        print(e, file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
