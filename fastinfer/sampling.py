"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty."""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """Defaults follow llama.cpp's. temperature=0 means greedy; top_k=0, top_p=1, min_p=0 disable."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        real = lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)  # noqa: E731
        checks = [
            ("temperature", real(self.temperature) and 0 <= self.temperature < float("inf"), "must be a number >= 0"),
            ("top_k", isinstance(self.top_k, (int, np.integer)) and not isinstance(self.top_k, bool)
             and self.top_k >= 0, "must be an integer >= 0"),
            ("top_p", real(self.top_p) and 0 < self.top_p <= 1, "must be a number in (0, 1]"),
            ("min_p", real(self.min_p) and 0 <= self.min_p <= 1, "must be a number in [0, 1]"),
            ("repetition_penalty", real(self.repetition_penalty) and 0 < self.repetition_penalty < float("inf"),
             "must be a number > 0"),
            ("seed", self.seed is None or (isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool)
                                           and self.seed >= 0), "must be a non-negative integer"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}; got {getattr(self, name)!r:.60}")


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """In place, HF's rule: a seen token's positive logit is divided by penalty, a negative one multiplied."""
    if penalty == 1.0 or seen.size == 0:
        return
    v = logits[seen]
    logits[seen] = np.where(v > 0, v / penalty, v * penalty)


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator, seen: np.ndarray,
           draft: int | None = None) -> int:
    """Pick a token id from logits (vocab,). `seen` holds the ids the penalty applies to.

    With a draft token (prompt-lookup decoding), the standard speculative rule for a draft that
    is certain: accept it with its probability p(draft), else sample from p without it,
    renormalized. The token then has distribution p, as without a draft. Greedy takes the argmax
    either way."""
    if p.repetition_penalty != 1.0:
        logits = logits.copy()
        apply_repetition_penalty(logits, np.unique(seen), p.repetition_penalty)
    if p.temperature == 0:
        return int(np.argmax(logits))
    cand, probs = _distribution(logits, p)
    if draft is not None:
        at = np.flatnonzero(cand == draft)
        pd = float(probs[at[0]]) if at.size else 0.0
        if rng.random() < pd:
            return int(draft)
        if at.size:  # rejected, so pd < 1: the rest has mass to renormalize
            cand, probs = np.delete(cand, at[0]), np.delete(probs, at[0])
            probs = probs / probs.sum()
    return int(cand[min(int(np.searchsorted(np.cumsum(probs), rng.random(), side="right")), len(probs) - 1)])


def _distribution(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The candidates and their probabilities after temperature, top-k, top-p and min-p (sorted,
    most likely first)."""
    # Work on the top-k candidates only: sorting 50k logits per token is the slow part otherwise.
    if 0 < p.top_k < logits.shape[0]:
        cand = np.argpartition(logits, -p.top_k)[-p.top_k:]
    else:
        cand = np.arange(logits.shape[0])
    z = logits[cand].astype(np.float64) / p.temperature
    order = np.argsort(-z, kind="stable")
    cand, z = cand[order], z[order]
    probs = np.exp(z - z[0])
    probs /= probs.sum()
    keep = len(probs)
    if p.top_p < 1.0:  # the smallest prefix whose mass reaches top_p
        keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
    if p.min_p > 0:
        keep = min(keep, max(1, int(np.count_nonzero(probs >= p.min_p * probs[0]))))
    return cand[:keep], probs[:keep] / probs[:keep].sum()
