"""Energy pruning of long prompts, and KV-cache eviction for long generations.

Prefill pruning (`Prune`): layers 0..from_layer-1 run on every prompt token, as usual. Then each
token gets a score, and only the top `keep` fraction (plus the first `sinks` tokens of the
sequence and the last `keep_last` of the prompt, always) goes on through the remaining layers.
Dropped tokens are never computed there, and those layers' KV caches never hold them, so the
prefill does roughly (from_layer + (n_layers - from_layer) * keep) / n_layers of the dense work.
Kept tokens keep their true RoPE positions.

Scores:
  "recent"     the token's position: the budget left after the sinks goes to the prompt's last
               tokens, one window (StreamingLLM's sinks + window, applied to a prompt);
  "norm"       L2 norm of the token's hidden state entering layer from_layer (high = keep): the
               idea that low-energy vectors contribute little;
  "low-norm"   the same, low = keep (one study found low-norm keys matter most);
  "attention"  attention mass the token receives at layer from_layer - 1 from the prompt's queries
               (the last RING of every prefill chunk), relative to uniform (H2O / LazyLLM);
  "attention-last"  the same from the prompt's last RING queries only (SnapKV).

Measured on held-out text (docs/performance.md, "Prefill pruning"), "recent" keeps the continuation's perplexity best
at every budget: a token's energy or the attention it drew in the first layers says less about
what the next tokens need than its distance from them does. Prune() therefore uses it.

KV eviction (`kv_budget=N`): no layer's cache ever holds more than N rows. When a layer would
overflow, it keeps the sinks, its most recent N // 4 rows, and the rows with the most attention
mass from the last EVICT_QUERIES queries (TOVA / SnapKV style), down to N - N // 8 rows, so the cost of
compacting is paid once every N // 8 tokens. Memory and per-token time stay flat.

Layers then hold different numbers of rows. `forward` handles that with State.drop: layer l
stores token t at row slots[t] - drop[l]. (A sliding attention window then counts cache rows,
not positions.)
"""
import math
from dataclasses import dataclass

import numba
import numpy as np

from .kernels import prune as K

SCORES = ("recent", "norm", "low-norm", "attention", "attention-last")
RING = 128           # recent queries kept per layer for the attention-mass score (SnapKV's window):
                     # half of each 256-token prefill chunk (fastinfer/model.py)
MIN_KV_BUDGET = 128  # room for the sinks, the recent window and one prefill chunk after eviction
EVICT_SINKS = 4      # sinks kept by eviction when no Prune says otherwise (StreamingLLM's 4)
EVICT_QUERIES = 8    # eviction scores rows by the attention of this many newest queries (TOVA uses
                     # one): 16x fewer than the ring holds; evicting 30 layers at 512 rows takes ~6.5 ms


@dataclass(frozen=True)
class Prune:
    """Prefill pruning: from layer `from_layer` on, keep the top `keep` fraction of the prompt's
    tokens by `score` (one of SCORES), always including the first `sinks` tokens of the sequence
    and the last `keep_last` tokens of the prompt.

    Prune() is the recommended setting: 2.4x faster prefill at +1.6% (6 held-out passages) to
    +2.6% (3 books) continuation perplexity on 2,048-token contexts, with the default f16 KV cache
    (docs/performance.md, "Prefill pruning", has the measurements).
    """
    keep: float = 0.5
    from_layer: int = 1
    score: str = "recent"
    sinks: int = 64
    keep_last: int = 256

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"Prune keep must be a fraction in (0, 1]; got {self.keep!r}")
        if not _is_int(self.from_layer) or self.from_layer < 1:
            raise ValueError(f"Prune from_layer must be an integer >= 1 (layers before it see every token); "
                             f"got {self.from_layer!r}")
        if self.score not in SCORES:
            raise ValueError(f"Prune score must be one of {', '.join(SCORES)}; got {self.score!r}")
        if not _is_int(self.sinks) or self.sinks < 0:
            raise ValueError(f"Prune sinks must be an integer >= 0; got {self.sinks!r}")
        if not _is_int(self.keep_last) or self.keep_last < 1:
            raise ValueError(f"Prune keep_last must be an integer >= 1 (the last token predicts the next); "
                             f"got {self.keep_last!r}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_options(model, prune, kv_budget) -> None:
    """One clear error for a bad `prune=` or `kv_budget=` before anything is allocated."""
    if prune is not None and not isinstance(prune, Prune):
        raise ValueError(f"prune must be a fastinfer.Prune(...) or None; got {prune!r}")
    if kv_budget is not None and (not _is_int(kv_budget) or kv_budget < MIN_KV_BUDGET):
        raise ValueError(f"kv_budget must be an integer >= {MIN_KV_BUDGET} (cache rows per layer); got {kv_budget!r}")
    if model is None or (prune is None and kv_budget is None):  # model None: the options alone
        return
    if model.args.arch != "llama":  # the per-layer rows and the query ring live in models/llama.py
        raise ValueError(f"prune and kv_budget need a Llama-family model; {model.source} is {model.args.arch}")
    if prune is not None and prune.from_layer >= model.args.n_layers:
        raise ValueError(f"Prune from_layer must be below the model's {model.args.n_layers} layers; "
                         f"got {prune.from_layer}")


class Pruning:
    """One session's pruning and eviction bookkeeping: how many rows each layer holds (fill) and
    which position each row belongs to (row_pos)."""

    def __init__(self, model, n_ctx: int, prune: Prune | None, kv_budget: int | None):
        check_options(model, prune, kv_budget)
        self.model, self.prune, self.budget = model, prune, kv_budget
        self.rows = n_ctx if kv_budget is None else min(n_ctx, kv_budget)
        L, threads = model.args.n_layers, model.threads
        self.fill = np.zeros(L, np.int64)                  # rows held per layer
        self.row_pos = np.full((L, self.rows), -1, np.int64)
        self.sinks = EVICT_SINKS if prune is None else prune.sinks
        self.recent = 0 if kv_budget is None else kv_budget // 4
        self.fscratch = np.zeros((threads, 6 * self.rows + 4 * K.SJ), np.float32)
        self.iscratch = np.zeros((threads, self.rows), np.int64)
        self.bscratch = np.zeros((threads, self.rows), np.bool_)
        self.kept: np.ndarray | None = None                # positions the last pruned prefill kept

    def new_state(self, chunk: int):
        a = self.model
        if self.budget is not None:  # after an eviction the budget must still hold a whole chunk
            chunk = min(chunk, MIN_KV_BUDGET // 2)
        return a.new_state(self.rows, chunk, ring=RING)

    def reset(self, state) -> None:
        self.fill[:] = 0
        state.drop[:] = 0
        state.ring_pos[:] = -1
        self.kept = None

    def rewind(self, state, pos: int) -> None:
        """Forget every row and ring query of positions pos and later. A layer's rows stay in
        position order (append_rows adds at the end, evict compacts in order), so they are its
        last rows."""
        for l in range(len(self.fill)):
            n = int(self.fill[l])
            self.fill[l] = np.searchsorted(self.row_pos[l, :n], pos)
            self.row_pos[l, self.fill[l]:n] = -1
        state.ring_pos[state.ring_pos >= pos] = -1
        self.kept = None

    # -- one compiled call over a layer range ---------------------------------------------------
    def run_chunk(self, session, ids: np.ndarray, positions: np.ndarray, virtual: int, all_logits: bool,
                  l0: int, l1: int) -> None:
        """Run ids (T,) at `positions` through layers l0..l1-1, after evicting if a layer would
        overflow. `virtual` is the dense slot of the first token; drop maps it to each layer's row."""
        st, T = session.state, len(ids)
        if self.budget is not None:
            limit = self.budget - T
            if self.fill[l0:l1].max() > limit:
                target = min(limit, self.budget - self.budget // 8)
                numba.set_num_threads(self.model.threads)
                K.evict(st.k_cache, st.v_cache, self.row_pos, self.fill, st.q_ring, st.ring_pos, l0, l1, limit,
                        target, self.sinks, self.recent, EVICT_QUERIES, self.fscratch, self.iscratch,
                        self.bscratch)
        np.subtract(virtual, self.fill, out=st.drop)
        slots = session._slots[:T]
        np.add(session._steps[:T], session.base + virtual, out=slots)
        numba.set_num_threads(self.model.threads)
        self.model.arch.run(self.model.args, self.model._w, session._st, ids, positions, session._starts[:T], slots,
                            session._pattern, all_logits, l0, l1, pruned=True, **session.run_options)
        K.append_rows(self.row_pos, self.fill, positions, l0, l1)

    # -- prefill ----------------------------------------------------------------------------------
    def prefill(self, session, ids: np.ndarray) -> np.ndarray:
        """Add ids to the session, pruned; return the logits after the last one."""
        st, chunk, p = session.state, session.state.chunk, self.prune
        N, pos0 = len(ids), session.pos
        steps = np.arange(N, dtype=np.int64)
        if p is None:  # eviction only
            for c in range(0, N, chunk):
                T = min(chunk, N - c)
                self.run_chunk(session, ids[c:c + T], pos0 + steps[c:c + T], pos0 + c, False, 0,
                               self.model.args.n_layers)
            session.pos += N
            return st.logits[0].copy()
        k, L = p.from_layer, self.model.args.n_layers
        x = np.empty((N, self.model.args.dim), np.float32)  # residual stream entering layer k
        mass = np.zeros((2, N), np.float32)  # attention received at layer k - 1 (rel. to uniform), queries
        for c in range(0, N, chunk):
            T = min(chunk, N - c)
            self.run_chunk(session, ids[c:c + T], pos0 + steps[c:c + T], pos0 + c, False, 0, k)
            x[c:c + T] = st.x[:T]
            if p.score == "attention":
                self._accumulate_mass(session, pos0, pos0 + c, mass)
        if p.score == "attention-last":  # the ring holds the prompt's last queries
            self._accumulate_mass(session, pos0, pos0, mass)
        kept = self.select(session, x, pos0, mass)
        xk = np.empty((len(kept), x.shape[1]), np.float32)
        K.gather_rows(xk, x, kept)
        for c in range(0, len(kept), chunk):
            T = min(chunk, len(kept) - c)
            st.x[:T] = xk[c:c + T]
            self.run_chunk(session, ids[kept[c:c + T]], pos0 + kept[c:c + T], pos0 + c, False, k, L)
        session.pos += N
        self.kept = pos0 + kept
        return st.logits[0].copy()

    def _accumulate_mass(self, session, pos0: int, q0: int, mass: np.ndarray) -> None:
        """Add the attention the chunk's queries (those still in the ring, from position q0 on) pay
        the prompt's rows at layer from_layer - 1: mass[0] += weight * rows seen (1 = uniform
        attention), mass[1] += number of those queries that see the row."""
        st, l = session.state, self.prune.from_layer - 1
        n = int(self.fill[l])
        m = np.empty(n, np.float32)
        numba.set_num_threads(self.model.threads)
        K.attention_mass(m, st.q_ring, st.ring_pos, st.k_cache, self.row_pos, l, q0, self.fscratch)
        rp = self.row_pos[l, :n]
        qp = np.sort(st.ring_pos[l][st.ring_pos[l] >= q0])
        mine = rp >= pos0  # rows of this prompt (earlier ones belong to earlier calls)
        tok = rp[mine] - pos0
        mass[0, tok] += m[mine] * n / self.model.args.n_heads
        mass[1, tok] += len(qp) - np.searchsorted(qp, rp[mine])

    def select(self, session, x: np.ndarray, pos0: int, mass: np.ndarray) -> np.ndarray:
        """Indices (ascending) of the prompt tokens x (N, dim) that go on past layer from_layer."""
        p, N = self.prune, x.shape[0]
        numba.set_num_threads(self.model.threads)
        scores = np.zeros(N, np.float32)
        if p.score == "recent":  # the later the token, the higher
            scores[:] = np.arange(N, dtype=np.float32)
        elif p.score.startswith("attention"):  # mean attention received, relative to uniform
            np.divide(mass[0], np.maximum(mass[1], 1), out=scores)
        else:
            K.token_norms(scores, x)
            if p.score == "low-norm":
                np.negative(scores, out=scores)
        forced = np.zeros(N, np.bool_)
        forced[:max(0, p.sinks - pos0)] = True
        forced[max(0, N - p.keep_last):] = True
        n_keep = min(N, max(1, math.ceil(p.keep * N)))
        idx = np.empty((1, N), np.int64)
        counts = np.empty(1, np.int64)
        K.select_top(idx, counts, scores[None], forced[None], n_keep, np.empty((1, N), np.float32))
        return idx[0, :counts[0]].copy()
