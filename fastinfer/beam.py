"""Beam search and the n-gram / min-length logits processors, with Hugging Face `generate` semantics.

Matches transformers' current `GenerationMixin._beam_search` (the vectorised rewrite that replaced
`BeamSearchScorer`/`BeamHypotheses`, v4.50+ through v4.57 / main):

* scores: `log_softmax(raw logits)` FIRST, then the processors (repetition penalty, no-repeat-ngram,
  min-new-tokens) are applied to those log-probs, with no renormalisation. This is HF's beam-search
  order (`log_probs = log_softmax(logits); log_probs = logits_processor(seqs, log_probs)`); the
  greedy/sampling path (`generate.py`) applies the processors to raw logits, as HF's `_sample` does.
* each step keeps the top `max(2, 1 + n_eos) * num_beams` (beam, token) pairs of the flattened
  `num_beams * vocab` running scores; at the first step only beam 0 is live (others start at -1e9).
* a candidate that hits a stopping criterion (an EOS token, or reaching max length) becomes a finished
  hypothesis only if its rank among those candidates is < num_beams; its score is
  `sum_logprobs / generated_len ** length_penalty`, where generated_len = `cur_len + 1 - prompt_len`,
  the number of NEW tokens including the EOS token itself (HF main's `_update_finished_beams`; the old
  `BeamHypotheses` with `generated_len` passed used the same count).
* stopping: `_check_early_stop_heuristic` / `_beam_search_has_unfinished_sequences` with
  early_stopping True / False / "never".
"""
from collections.abc import Callable, Sequence

import numpy as np

from .sampling import apply_repetition_penalty

NEG = -1.0e9  # HF's "impossible" score offset


def no_repeat_ngram_ban(seq: Sequence[int], n: int) -> list[int]:
    """Token ids that would complete an n-gram already present in seq (HF `_calc_banned_ngram_tokens`).

    The last n-1 tokens of seq are the prefix; every earlier occurrence of that prefix bans the token
    that followed it. n <= 0 disables; sequences shorter than n-1 ban nothing.
    """
    if n <= 0 or len(seq) + 1 < n:
        return []
    arr = np.asarray(seq, dtype=np.int64)
    if n == 1:
        return list(dict.fromkeys(arr.tolist()))
    m, count = n - 1, len(arr) - n + 1  # n-grams start at 0..len-n
    if count <= 0:
        return []
    mask = np.ones(count, dtype=bool)
    prefix = arr[len(arr) - m:]
    for j in range(m):
        mask &= arr[j:j + count] == prefix[j]
    return list(dict.fromkeys(arr[m:m + count][mask].tolist()))


def process_scores(scores: np.ndarray, seq: Sequence[int], n_new: int, eos_ids: Sequence[int],
                   no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0,
                   min_new_tokens: int = 0) -> None:
    """In place, HF's processor order: repetition penalty, no-repeat-ngram, min-new-tokens.

    `seq` is the whole sequence (prompt + generated), `n_new` how many of it were generated.
    """
    if repetition_penalty != 1.0 and len(seq):
        apply_repetition_penalty(scores, np.unique(np.asarray(seq, dtype=np.int64)), repetition_penalty)
    if no_repeat_ngram_size > 0:
        banned = no_repeat_ngram_ban(seq, no_repeat_ngram_size)
        if banned:
            scores[banned] = -np.inf
    if n_new < min_new_tokens and len(eos_ids):
        scores[list(eos_ids)] = -np.inf


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def _copy_cache(dst, src, pos: int) -> None:
    dst.state.k_cache[:, :, :pos] = src.state.k_cache[:, :, :pos]
    dst.state.v_cache[:, :, :pos] = src.state.v_cache[:, :, :pos]
    dst.pos = pos


def _reorder_caches(sessions: list, src: Sequence[int], pos: int) -> None:
    """Make sessions[j] hold the cache of (old) sessions[src[j]], all at the same pos."""
    moves = [(j, s) for j, s in enumerate(src) if s != j]
    if not moves:
        return
    # Snapshot every source first: a beam can be both overwritten and the source of another beam.
    snap = {s: (sessions[s].state.k_cache[:, :, :pos].copy(), sessions[s].state.v_cache[:, :, :pos].copy())
            for s in {s for _, s in moves}}
    for j, s in moves:
        k, v = snap[s]
        sessions[j].state.k_cache[:, :, :pos] = k
        sessions[j].state.v_cache[:, :, :pos] = v
        sessions[j].pos = pos


def beam_search_scored(session_factory: Callable[[], object], prompt_ids: Sequence[int], num_beams: int,
                       max_new_tokens: int, eos_ids: Sequence[int], length_penalty: float = 1.0,
                       early_stopping: bool | str = False, no_repeat_ngram_size: int = 0,
                       repetition_penalty: float = 1.0, min_new_tokens: int = 0) -> tuple[list[int], float]:
    """HF beam search proper (for any num_beams >= 1). Returns (best new tokens incl. EOS, its score)."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1; got {num_beams}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never'; got {early_stopping!r}")
    prompt = [int(t) for t in prompt_ids]
    eos = np.asarray(sorted({int(e) for e in eos_ids}), dtype=np.int64)
    prompt_len = len(prompt)

    sessions = [session_factory() for _ in range(num_beams)]
    logits0 = np.asarray(sessions[0].prefill(prompt), dtype=np.float32).copy()
    pos = sessions[0].pos
    for s in sessions[1:]:
        _copy_cache(s, sessions[0], pos)
    max_seq = getattr(sessions[0], "max_seq", None)
    # Like generate_ids: the last token need not fit in the cache, it is never fed back.
    max_new = max_new_tokens if max_seq is None else min(max_new_tokens, max_seq - pos + 1)
    max_length = prompt_len + max_new

    vocab = logits0.shape[0]
    beams_to_keep = max(2, 1 + len(eos)) * num_beams
    running = [list(prompt) for _ in range(num_beams)]
    running_scores = np.full(num_beams, NEG, dtype=np.float64)
    running_scores[0] = 0.0
    fin_seqs: list[list[int] | None] = [None] * num_beams
    fin_scores = np.full(num_beams, NEG, dtype=np.float64)
    fin_done = np.zeros(num_beams, dtype=bool)
    heuristic_unsatisfied = True
    cur_len = prompt_len
    logits = [logits0] * num_beams

    while True:
        # b. log-probs, then processors (HF beam-search order), plus the running score
        all_lp = np.empty((num_beams, vocab), dtype=np.float64)
        for b in range(num_beams):
            lp = _log_softmax(logits[b])
            process_scores(lp, running[b], cur_len - prompt_len, eos, no_repeat_ngram_size,
                           repetition_penalty, min_new_tokens)
            all_lp[b] = lp + running_scores[b]
        flat = all_lp.reshape(-1)
        k = min(beams_to_keep, flat.size)
        top = np.argsort(-flat, kind="stable")[:k]
        top_scores = flat[top]
        top_beam, top_tok = top // vocab, top % vocab
        # d. stopping criteria per candidate: EOS, or the max length reached with this token
        hits = np.isin(top_tok, eos) | (cur_len + 1 >= max_length)
        # e. next running beams: best num_beams candidates that did not stop
        run_scores = top_scores + hits * NEG
        nxt = np.argsort(-run_scores, kind="stable")[:num_beams]
        # f. finished hypotheses: only candidates ranked < num_beams, length-normalised
        fin_cand = top_scores / float(cur_len + 1 - prompt_len) ** length_penalty
        if fin_done.all() and early_stopping is True:
            fin_cand = fin_cand + NEG
        if not heuristic_unsatisfied:
            fin_cand = fin_cand + NEG
        just_done = hits & (np.arange(k) < num_beams)
        fin_cand = fin_cand + (~just_done) * NEG
        m_scores = np.concatenate([fin_scores, fin_cand])
        m_seqs = fin_seqs + [running[int(b)] + [int(t)] for b, t in zip(top_beam, top_tok)]
        m_done = np.concatenate([fin_done, just_done])
        keep = np.argsort(-m_scores, kind="stable")[:num_beams]
        fin_scores, fin_done = m_scores[keep], m_done[keep]
        fin_seqs = [m_seqs[i] for i in keep]
        src = [int(top_beam[i]) for i in nxt]
        running = [running[int(top_beam[i])] + [int(top_tok[i])] for i in nxt]
        running_scores = run_scores[nxt].copy()
        cur_len += 1
        # g. whole-search stopping condition
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - prompt_len
        else:
            best_len = cur_len - prompt_len
        best_possible = running_scores[0] / float(best_len) ** length_penalty
        worst_fin = np.where(fin_done, fin_scores.min(), NEG)
        heuristic_unsatisfied = heuristic_unsatisfied and bool(np.any(best_possible > worst_fin))
        open_beam = not (fin_done.all() and early_stopping is True)
        if not (heuristic_unsatisfied and open_beam and not hits.all()):
            break
        # next step: reorder the caches, then feed every running beam its new token
        _reorder_caches(sessions, src, pos)
        logits = [np.asarray(sessions[b].decode_step(running[b][-1]), dtype=np.float32).copy()
                  for b in range(num_beams)]
        pos += 1

    best = fin_seqs[0] if fin_seqs[0] is not None else running[0]
    return best[prompt_len:], float(fin_scores[0])


def beam_search(session_factory: Callable[[], object], prompt_ids: Sequence[int], num_beams: int,
                max_new_tokens: int, eos_ids: Sequence[int], length_penalty: float = 1.0,
                early_stopping: bool | str = False, no_repeat_ngram_size: int = 0,
                repetition_penalty: float = 1.0, min_new_tokens: int = 0) -> list[int]:
    """The best sequence's new tokens (EOS excluded), as HF `generate(num_beams=...)` would pick.

    num_beams=1 is greedy search, as in HF (which routes num_beams=1 to greedy decoding, whose
    processors act on raw logits).
    """
    if num_beams == 1:
        from .generate import generate_ids
        from .sampling import SamplingParams
        params = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                                repetition_penalty=repetition_penalty)
        return list(generate_ids(session_factory(), prompt_ids, max_new_tokens, params, eos_ids,
                                 no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens))
    toks, _ = beam_search_scored(session_factory, prompt_ids, num_beams, max_new_tokens, eos_ids,
                                 length_penalty, early_stopping, no_repeat_ngram_size,
                                 repetition_penalty, min_new_tokens)
    if toks and toks[-1] in set(int(e) for e in eos_ids):
        toks = toks[:-1]
    return toks
