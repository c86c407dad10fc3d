"""Perplexity of a model on a text, over non-overlapping windows.

The first `n_tokens` tokens of the text are split into non-overlapping windows of `ctx` tokens
(the last one may be shorter). Each window runs from an empty state, and every token of it but
the first is scored: its negative log-likelihood under the logits at the position before it,
through a log-softmax in float64. Perplexity = exp(total NLL / tokens scored).
"""
import gzip
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROWS_PER_BLOCK = 128  # logit rows widened to float64 at a time: 128 x 49k vocab = 50 MB


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float                # exp(nll)
    nll: float                # mean negative log-likelihood per scored token, in nats
    n_scored: int             # tokens scored: n_tokens minus one per window
    n_tokens: int             # tokens run through the model
    ctx: int                  # window length
    seconds: float            # wall time of the forward passes and the scoring
    tokens_per_second: float  # n_tokens / seconds


def check_options(ctx: int, n_tokens: int | None = None) -> None:
    """Raise ValueError unless ctx (and n_tokens, if given) are at least 2."""
    if not isinstance(ctx, (int, np.integer)) or ctx < 2:
        raise ValueError(f"ctx (--ctx) must be an integer of at least 2, since the first token of each "
                         f"window is not scored; got {ctx!r}")
    if n_tokens is not None and (not isinstance(n_tokens, (int, np.integer)) or n_tokens < 2):
        raise ValueError(f"n_tokens (--tokens) must be an integer of at least 2; got {n_tokens!r}")


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each row, in float64.

    logits (T, vocab), targets (T,) -> (T,). The row maximum is subtracted before exp, so large
    logits cannot overflow."""
    out = np.empty(len(targets), np.float64)
    for r in range(0, len(targets), ROWS_PER_BLOCK):
        x = logits[r:r + ROWS_PER_BLOCK].astype(np.float64)                     # (rows, vocab)
        t = targets[r:r + ROWS_PER_BLOCK]
        x -= x.max(axis=1, keepdims=True)  # shifted, the row's largest logit is 0
        out[r:r + len(t)] = np.log(np.exp(x).sum(axis=1)) - x[np.arange(len(t)), t]
    return out


def perplexity(model, ids: Sequence[int], ctx: int = 1024, progress: bool = False) -> "PerplexityResult":
    """Perplexity of `model` on the token ids `ids`, in non-overlapping windows of `ctx` tokens.

    `model` needs `.forward(ids) -> (len(ids), vocab) logits` that keeps no state, and `.n_ctx`.
    A window of one token (a short tail) scores nothing and is not run. With progress=True a
    tqdm bar over the windows goes to stderr."""
    check_options(ctx)
    ids = np.asarray([int(i) for i in ids], dtype=np.int64)
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens; got {len(ids)}")
    if ctx > model.n_ctx:
        raise ValueError(f"ctx {ctx} is longer than the model's context of {model.n_ctx} tokens "
                         f"(load the model with n_ctx={ctx} or more, e.g. fastinfer.load(..., n_ctx={ctx}))")
    starts = range(0, len(ids), ctx)
    total, n_scored = 0.0, 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(starts), unit="window", file=sys.stderr, leave=False, desc="perplexity")
    t0 = time.perf_counter()
    try:
        for s in starts:
            window = ids[s:s + ctx]
            if len(window) >= 2:
                logits = np.asarray(model.forward(window.tolist()))          # (len(window), vocab)
                nll = token_nll(logits[:-1], window[1:])
                if np.isnan(nll).any():
                    raise RuntimeError(f"the model produced NaN logits in the window at token {s}")
                total += float(nll.sum())
                n_scored += len(nll)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ppl=f"{math.exp(total / n_scored):.2f}" if n_scored else "-")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    mean = total / n_scored
    return PerplexityResult(ppl=math.exp(mean), nll=mean, n_scored=n_scored, n_tokens=len(ids), ctx=ctx,
                            seconds=seconds, tokens_per_second=len(ids) / seconds if seconds > 0 else math.inf)


def text_ids(model, text: str, n_tokens: int) -> list[int]:
    """The first n_tokens token ids of text, without special tokens (fewer if the text is shorter)."""
    check_options(2, n_tokens)
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids[:n_tokens]
    if len(ids) < 2:
        raise ValueError(f"the text is {len(ids)} token{'s' if len(ids) != 1 else ''} long; "
                         f"perplexity needs at least 2")
    return ids


def perplexity_of_text(model, text: str, ctx: int = 1024, n_tokens: int = 4096,
                       progress: bool = False) -> PerplexityResult:
    """`perplexity` over the first n_tokens tokens of text (all of them if the text is shorter;
    the result's n_tokens says how many were used)."""
    check_options(ctx, n_tokens)
    return perplexity(model, text_ids(model, text, n_tokens), ctx, progress)


def read_text(file: str | Path) -> str:
    """The UTF-8 text of a file, "-" for stdin; gzip-compressed input is recognised by its magic
    bytes and decompressed."""
    if str(file) == "-":
        data, name = sys.stdin.buffer.read(), "stdin"
    else:
        data, name = Path(file).read_bytes(), str(file)
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return data.decode("utf-8")
    except (OSError, EOFError) as e:
        raise ValueError(f"{name}: not a readable gzip file ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
