"""The continuation protocol: what an approximation (pruning, sparse attention, spectral filtering)
costs in speed and quality against dense, on text the model has not seen.

For a context length N: the first N tokens of a text are prefilled (timed), then the next
`n_next` true tokens are fed (teacher forcing) and each is scored by the logits before it. They
are fed in chunks, or with steps=True one per call, as generation feeds the tokens it samples;
the two are the same computation except where a session treats a call's last tokens apart
(BlockSparse's dense_last: every generated token attends densely). The same runs densely and
approximately; a comparison reports the prefill speedup, the continuation perplexity under both,
and how often the two agree on the top-1 token.

Session options (`prune=`, `kv_budget=`, `attention=`, ...) pass straight to `model.session`.
"""
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .perplexity import token_nll

N_NEXT = 256  # true tokens scored after the context


@dataclass(frozen=True)
class Continuation:
    context: int              # tokens prefilled
    prefill_seconds: float    # wall time of the prefill alone
    nll: float                # mean negative log-likelihood of the next tokens, nats
    top1: np.ndarray          # (n_next,) argmax token at each scored position

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@dataclass(frozen=True)
class Comparison:
    label: str                # the approximation, e.g. "norm keep=0.5"
    context: int
    dense_seconds: float
    seconds: float
    dense_ppl: float
    ppl: float
    top1_agreement: float     # fraction of scored positions whose argmax equals dense's
    dense_std: float = 0.0    # std of the prefill seconds over repetitions (0: one run)
    std: float = 0.0
    per_text: tuple = ()      # perplexity change on each text, when quality is pooled over several

    @property
    def speedup(self) -> float:
        return self.dense_seconds / self.seconds

    @property
    def ppl_change(self) -> float:
        """Relative change of the continuation perplexity: +0.03 is 3% worse than dense."""
        return self.ppl / self.dense_ppl - 1.0


def continuation(model, ids: Sequence[int], context: int, n_next: int = N_NEXT, steps: bool = False,
                 **session_options) -> Continuation:
    """Prefill ids[:context] (timed), then score ids[context:context + n_next], each by the logits
    before it; steps=True feeds them one decode step at a time (see the module docstring)."""
    need = context + n_next
    if context < 1 or n_next < 1:
        raise ValueError(f"context and n_next must be positive; got {context} and {n_next}")
    if len(ids) < need:
        raise ValueError(f"the text has {len(ids)} tokens; a context of {context} plus {n_next} "
                         f"scored tokens needs {need}")
    ids = np.asarray(ids[:need], dtype=np.int64)
    s = model.session(n_ctx=need, **session_options)
    t0 = time.perf_counter()
    last = s.prefill(ids[:context])                         # (vocab,) predicts ids[context]
    seconds = time.perf_counter() - t0
    if steps:
        rest = np.array([s.decode_step(t).copy() for t in ids[context:need - 1]]).reshape(-1, last.shape[0])
    else:
        rest = s.append(ids[context:need - 1])              # (n_next - 1, vocab)
    logits = np.concatenate([last[None, :], rest])          # (n_next, vocab) predicts ids[context:need]
    nll = token_nll(logits, ids[context:need])
    if np.isnan(nll).any():
        raise RuntimeError(f"the model produced NaN logits after a context of {context}")
    return Continuation(context, seconds, float(nll.mean()), logits.argmax(axis=1))


def compare(label: str, dense, approx, dense_times: Sequence[float] = (),
            times: Sequence[float] = ()) -> Comparison:
    """dense / approx: one Continuation each, or one per text (the same texts in the same order),
    whose quality is pooled over all their scored tokens. dense_times / times: prefill seconds of
    repeated runs; their mean replaces the first continuation's own."""
    dense = [dense] if isinstance(dense, Continuation) else list(dense)
    approx = [approx] if isinstance(approx, Continuation) else list(approx)
    if len(dense) != len(approx) or any(d.context != a.context for d, a in zip(dense, approx)):
        raise ValueError(f"dense and {label} must be continuations of the same texts at the same contexts")
    d_mean, d_std = _mean_std(dense_times, dense[0].prefill_seconds)
    mean, std = _mean_std(times, approx[0].prefill_seconds)
    d_nll = float(np.mean([d.nll for d in dense]))
    nll = float(np.mean([a.nll for a in approx]))
    agree = float(np.mean(np.concatenate([d.top1 == a.top1 for d, a in zip(dense, approx)])))
    per_text = tuple(math.exp(a.nll - d.nll) - 1.0 for d, a in zip(dense, approx)) if len(dense) > 1 else ()
    return Comparison(label, dense[0].context, d_mean, mean, math.exp(d_nll), math.exp(nll), agree, d_std, std,
                      per_text)


def _mean_std(xs: Sequence[float], single: float) -> tuple[float, float]:
    if not len(xs):
        return single, 0.0
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def prefill_seconds(model, ids: Sequence[int], context: int, **session_options) -> float:
    """Wall time of prefilling ids[:context] into a fresh session (no scoring)."""
    s = model.session(n_ctx=context, **session_options)
    ids = np.asarray(ids[:context], dtype=np.int64)
    t0 = time.perf_counter()
    s.prefill(ids)
    return time.perf_counter() - t0


def sweep(model, texts: Sequence[Sequence[int]], contexts: Sequence[int], settings: dict[str, dict],
          repeats: int = 3, n_next: int = N_NEXT, log=None) -> list[Comparison]:
    """Dense against every setting (label -> session options) at every context length.

    texts: token sequences. Quality is pooled over all of them (n_next scored tokens each: one
    passage's perplexity swings by several percent), from one continuation each (it is
    deterministic). Prefill is timed on the first text: its continuation's prefill and
    `repeats - 1` further ones, dense and the settings alternating so that a noisy machine hurts
    all alike.
    """
    rows = []
    first = texts[0]
    for n in contexts:
        dense = [continuation(model, ids, n, n_next) for ids in texts]
        runs = {label: [continuation(model, ids, n, n_next, **opts) for ids in texts]
                for label, opts in settings.items()}
        times: dict[str | None, list[float]] = {None: [dense[0].prefill_seconds],
                                                **{label: [runs[label][0].prefill_seconds] for label in settings}}
        for _ in range(repeats - 1):
            times[None].append(prefill_seconds(model, first, n))
            for label, opts in settings.items():
                times[label].append(prefill_seconds(model, first, n, **opts))
        for label in settings:
            r = compare(label, dense, runs[label], times[None], times[label])
            rows.append(r)
            if log:
                log(f"context {n}: {label}: {r.speedup:.2f}x, ppl {r.ppl_change:+.1%}, top-1 {r.top1_agreement:.1%}")
    return rows


def markdown_table(rows: Sequence[Comparison]) -> str:
    pooled = any(r.per_text for r in rows)  # quality over several texts: show each text's change too
    extra = (" Δppl per text |", "---|") if pooled else ("", "")
    lines = [f"| context | setting | prefill s (dense) | prefill s | speedup | ppl (dense) | ppl | Δppl |{extra[0]} "
             f"top-1 agree |", f"|---:|---|---:|---:|---:|---:|---:|---:|{extra[1]}---:|"]
    for r in rows:
        d = f"{r.dense_seconds:.2f} ± {r.dense_std:.2f}" if r.dense_std else f"{r.dense_seconds:.2f}"
        a = f"{r.seconds:.2f} ± {r.std:.2f}" if r.std else f"{r.seconds:.2f}"
        each = f" {', '.join(f'{c:+.1%}' for c in r.per_text)} |" if pooled else ""
        lines.append(f"| {r.context} | {r.label} | {d} | {a} | {r.speedup:.2f}× | "
                     f"{r.dense_ppl:.3f} | {r.ppl:.3f} | {r.ppl_change:+.1%} |{each} {r.top1_agreement:.1%} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Comparison], path: str | Path, title: str) -> None:
    """Speedup against perplexity change, one series per setting label; needs matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the plot needs matplotlib: pip install 'fastinfer[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r.label for r in rows):
        pts = [r for r in rows if r.label == label]
        ax.plot([100 * r.ppl_change for r in pts], [r.speedup for r in pts], "o-", label=label)
        for r in pts:
            ax.annotate(str(r.context), (100 * r.ppl_change, r.speedup), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("continuation perplexity change vs dense (%)")
    ax.set_ylabel("prefill speedup vs dense (×)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
