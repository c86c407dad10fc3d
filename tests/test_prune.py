"""Prefill pruning and KV-cache eviction (fastinfer/prune.py, kernels/prune.py).

Kernels are checked against plain-NumPy twins written from their docstrings, on odd sizes.
Sessions are checked against an independent float64 NumPy model that processes one token at a
time with a per-layer KV cache, and applies the documented pruning and eviction rules itself:
layers before from_layer see every prompt token, later layers only the kept ones; eviction keeps
sinks, the recent window and the rows with the most attention mass from the last 32 queries.
"""
import math

import numpy as np
import pytest

import fastinfer
import reference as R
from fastinfer import Prune
from fastinfer.kernels import prune as K
from tiny_models import TINY_CFG, random_llama_weights, tiny_bpe_tokenizer, write_hf_dir

RING = 32   # queries the attention-mass score looks at (fastinfer/prune.py's RING, set below)
CHUNK = 64  # prefill chunk: the "attention" score sums each chunk's last RING queries


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 64 and a ring of 32, so that the tests' prompts of ~150 tokens cross chunk
    boundaries; the engine's own values (256, 128) keep the same ratio."""
    import fastinfer.model
    import fastinfer.prune
    monkeypatch.setattr(fastinfer.model, "PREFILL_CHUNK", CHUNK)
    monkeypatch.setattr(fastinfer.prune, "RING", RING)


# ----------------------------------------------------------------------------------------------
# NumPy twins of the kernels
# ----------------------------------------------------------------------------------------------

def twin_mass(q_ring, ring_pos, k_cache, row_pos, l, n, q0=0):
    """Sum over ring queries (positions >= q0) and heads of softmax(q . k / sqrt(hd)) over the
    causally visible rows."""
    W, H, hd = q_ring.shape[1:]
    group = H // k_cache.shape[1]
    out = np.zeros(n)
    for w in range(W):
        if ring_pos[l, w] < max(q0, 0):
            continue
        for h in range(H):
            s = k_cache[l, h // group, :n].astype(np.float64) @ q_ring[l, w, h].astype(np.float64) / math.sqrt(hd)
            s = np.where(row_pos[l, :n] <= ring_pos[l, w], s, -np.inf)
            if np.isinf(s).all():
                continue
            e = np.exp(s - s.max())
            out += e / e.sum()
    return out


def twin_select(scores, forced, k):
    """Forced rows, then the highest scores (earlier row first on ties), k in all; ascending."""
    n = len(scores)
    free = [j for j in sorted(range(n), key=lambda j: (-scores[j], j)) if not forced[j]]
    chosen = set(np.flatnonzero(forced)) | set(free[:max(0, k - int(forced.sum()))])
    return np.array(sorted(chosen), dtype=np.int64)


def test_token_norms_odd_sizes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 29)).astype(np.float32)
    out = np.zeros(37, np.float32)
    K.token_norms(out, x)
    np.testing.assert_allclose(out, np.sqrt((x.astype(np.float64) ** 2).sum(1)), rtol=1e-5)


@pytest.mark.parametrize("H,KV,n,W", [(6, 2, 37, 5), (3, 3, 1, 1), (4, 1, 53, 7)])
def test_attention_mass_matches_twin(H, KV, n, W):
    rng = np.random.default_rng(n)
    L, hd, rows = 3, 6, n + 4
    q_ring = rng.standard_normal((L, W, H, hd)).astype(np.float32)
    k_cache = rng.standard_normal((L, KV, rows, hd)).astype(np.float32)
    row_pos = np.full((L, rows), -1, np.int64)
    row_pos[:, :n] = np.sort(rng.choice(3 * n, n, replace=False))   # gaps: some tokens were dropped
    ring_pos = rng.integers(0, 3 * n, (L, W))
    ring_pos[:, 0] = -1                                            # an empty ring slot
    scratch = np.full((4, 3 * n + 3), np.nan, np.float32)          # garbage must not leak in
    for l in range(L):
        for q0 in (0, n):
            out = np.zeros(n, np.float32)
            K.attention_mass(out, q_ring, ring_pos, k_cache, row_pos, l, q0, scratch)
            np.testing.assert_allclose(out, twin_mass(q_ring, ring_pos, k_cache, row_pos, l, n, q0),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,k,n_forced", [(41, 17, 5), (41, 3, 9), (1, 1, 0), (64, 64, 3), (33, 20, 0)])
def test_select_top_matches_twin(n, k, n_forced):
    rng = np.random.default_rng(n + k)
    R_ = 3
    scores = rng.integers(0, 7, (R_, n)).astype(np.float32)  # many ties
    scores[1] = rng.standard_normal(n)
    forced = np.zeros((R_, n), np.bool_)
    for r in range(R_):
        forced[r, rng.choice(n, n_forced, replace=False)] = True
    idx = np.full((R_, n), -1, np.int64)
    counts = np.zeros(R_, np.int64)
    K.select_top(idx, counts, scores, forced, k, np.zeros((R_, n), np.float32))
    for r in range(R_):
        want = twin_select(scores[r], forced[r], k)
        assert counts[r] == len(want) == max(k, n_forced)
        np.testing.assert_array_equal(idx[r, :counts[r]], want)


def test_gather_rows():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((23, 7)).astype(np.float32)
    idx = np.array([0, 3, 4, 11, 22], np.int64)
    out = np.zeros((5, 7), np.float32)
    K.gather_rows(out, x, idx)
    np.testing.assert_array_equal(out, x[idx])


def test_store_queries_and_append_rows():
    L, W, H, hd = 2, 5, 3, 4
    q_ring = np.zeros((L, W, H, hd), np.float32)
    ring_pos = np.full((L, W), -1, np.int64)
    q = np.arange(7 * H * hd, dtype=np.float32).reshape(7, H, hd)
    pos = np.arange(10, 17, dtype=np.int64)
    K.store_queries(q_ring, ring_pos, q, 1, pos)
    assert (ring_pos[0] == -1).all()
    for t in range(2, 7):  # the last W queries survive, at slot position % W
        np.testing.assert_array_equal(q_ring[1, pos[t] % W], q[t])
        assert ring_pos[1, pos[t] % W] == pos[t]
    K.store_queries(np.zeros((L, 0, H, hd), np.float32), np.zeros((L, 0), np.int64), q, 1, pos)  # width 0: no-op
    row_pos = np.full((3, 12), -1, np.int64)
    fill = np.array([2, 5, 0], np.int64)
    K.append_rows(row_pos, fill, np.array([7, 9, 10], np.int64), 1, 3)
    assert list(fill) == [2, 8, 3]
    assert list(row_pos[1, 5:8]) == [7, 9, 10] and list(row_pos[2, :3]) == [7, 9, 10] and (row_pos[0] == -1).all()


@pytest.mark.parametrize("queries", [5, 2])
def test_evict_matches_twin(queries):
    """queries=2: only the two newest ring positions score the rows."""
    rng = np.random.default_rng(3)
    L, KV, H, hd, rows, W = 4, 2, 4, 6, 50, 5
    k_cache = rng.standard_normal((L, KV, rows, hd)).astype(np.float32)
    v_cache = rng.standard_normal((L, KV, rows, hd)).astype(np.float32)
    fill = np.array([50, 31, 49, 50], np.int64)
    row_pos = np.full((L, rows), -1, np.int64)
    for l in range(L):
        row_pos[l, :fill[l]] = np.sort(rng.choice(200, fill[l], replace=False))
    q_ring = rng.standard_normal((L, W, H, hd)).astype(np.float32)
    ring_pos = np.tile(np.array([197, 198, 199, 195, 196], np.int64), (L, 1))  # a ring wrapped around
    ring_pos[2, 1] = -1
    k0, v0, p0, f0 = k_cache.copy(), v_cache.copy(), row_pos.copy(), fill.copy()
    limit, target, sinks, recent = 40, 33, 20, 7
    K.evict(k_cache, v_cache, row_pos, fill, q_ring, ring_pos, 1, 4, limit, target, sinks, recent, queries,
            np.zeros((2, 6 * rows + 4 * K.SJ), np.float32), np.zeros((2, rows), np.int64), np.zeros((2, rows), np.bool_))
    for l in range(L):
        n = f0[l]
        if l == 0 or n <= limit:  # outside [l0, l1) or not over the limit: untouched
            assert fill[l] == n
            np.testing.assert_array_equal(k_cache[l], k0[l])
            continue
        mass = twin_mass(q_ring, ring_pos, k0, p0, l, n, q0=ring_pos[l].max() - queries + 1)
        forced = (p0[l, :n] < sinks) | (np.arange(n) >= n - recent)
        keep = twin_select(mass, forced, target)
        assert fill[l] == len(keep) == max(target, forced.sum())
        np.testing.assert_array_equal(row_pos[l, :fill[l]], p0[l, keep])
        np.testing.assert_array_equal(k_cache[l, :, :fill[l]], k0[l][:, keep])
        np.testing.assert_array_equal(v_cache[l, :, :fill[l]], v0[l][:, keep])


# ----------------------------------------------------------------------------------------------
# sessions on a tiny random model, against an independent NumPy model
# ----------------------------------------------------------------------------------------------

CFG = TINY_CFG  # 3 layers, 4 heads over 2 kv heads, head_dim 16


@pytest.fixture(scope="module")
def weights():
    return random_llama_weights(CFG, seed=5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, weights):
    return write_hf_dir(tmp_path_factory.mktemp("tiny-prune") / "hf", CFG, weights, tokenizer=tiny_bpe_tokenizer())


@pytest.fixture(scope="module")
def model(tiny_dir):
    """An f32 KV cache: exact against the float64 NumPy model below."""
    return fastinfer.load(tiny_dir, n_ctx=256, kv_type="f32")


@pytest.fixture(scope="module")
def half_model(tiny_dir):
    """The default (f16) KV cache."""
    return fastinfer.load(tiny_dir, n_ctx=256)


class RefModel:
    """The Llama network token by token in float64, one list of (position, k, v) per layer; the
    last RING queries of each layer are kept for the attention-mass score."""

    def __init__(self, w, cfg):
        self.w, self.cfg = w, cfg
        self.H, self.KV, self.hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], R.head_dim_of(cfg)
        self.L, self.eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
        self.inv_freq = R.hf_inv_freq(cfg)
        self.cache = [[] for _ in range(self.L)]
        self.queries = [[] for _ in range(self.L)]

    def embed(self, tok):
        return self.w["model.embed_tokens.weight"][tok].astype(np.float64)

    def layer(self, l, x, pos):
        w, p = self.w, f"model.layers.{l}."
        h = R.rms_norm(x, w[p + "input_layernorm.weight"], self.eps)[None]
        q = R._linear(h, w[p + "self_attn.q_proj.weight"]).reshape(1, self.H, self.hd)
        k = R._linear(h, w[p + "self_attn.k_proj.weight"]).reshape(1, self.KV, self.hd)
        v = R._linear(h, w[p + "self_attn.v_proj.weight"]).reshape(self.KV, self.hd)
        q = R.rope_split_half(q, np.array([pos]), self.inv_freq)[0]
        k = R.rope_split_half(k, np.array([pos]), self.inv_freq)[0]
        self.cache[l].append((pos, k, v))
        self.queries[l] = (self.queries[l] + [(pos, q)])[-RING:]
        ks = np.stack([c[1] for c in self.cache[l]])   # (n, KV, hd)
        vs = np.stack([c[2] for c in self.cache[l]])
        g = self.H // self.KV
        att = np.zeros((self.H, self.hd))
        for hh in range(self.H):
            a = R.softmax(ks[:, hh // g] @ q[hh] / math.sqrt(self.hd))
            att[hh] = a @ vs[:, hh // g]
        x = x + R._linear(att.reshape(1, -1), w[p + "self_attn.o_proj.weight"])[0]
        h = R.rms_norm(x, w[p + "post_attention_layernorm.weight"], self.eps)
        gu = R.silu(R._linear(h, w[p + "mlp.gate_proj.weight"])) * R._linear(h, w[p + "mlp.up_proj.weight"])
        return x + R._linear(gu, w[p + "mlp.down_proj.weight"])

    def logits(self, x):
        x = R.rms_norm(x, self.w["model.norm.weight"], self.eps)
        return R._linear(x, self.w["lm_head.weight"])

    def token(self, tok, pos):
        x = self.embed(tok)
        for l in range(self.L):
            x = self.layer(l, x, pos)
        return self.logits(x)

    def mass(self, l, q0=0):
        """Attention mass each cached row of layer l gets from its last RING queries (those at
        positions >= q0), and how many of them see each row."""
        g = self.H // self.KV
        out = np.zeros(len(self.cache[l]))
        cpos = np.array([c[0] for c in self.cache[l]])
        ks = np.stack([c[1] for c in self.cache[l]])
        seen = np.zeros(len(cpos))
        for qp, q in self.queries[l]:
            if qp < q0:
                continue
            seen += cpos <= qp
            for hh in range(self.H):
                s = np.where(cpos <= qp, ks[:, hh // g] @ q[hh] / math.sqrt(self.hd), -np.inf)
                out += R.softmax(s)
        return out, seen

    def evict(self, l, target, sinks, recent, queries):
        n = len(self.cache[l])
        mass, _ = self.mass(l, q0=self.queries[l][-1][0] - queries + 1)  # the newest `queries` positions
        forced = np.array([c[0] < sinks for c in self.cache[l]]) | (np.arange(n) >= n - recent)
        keep = twin_select(mass, forced, target)
        self.cache[l] = [self.cache[l][j] for j in keep]


def ref_pruned_prefill(ref, ids, p: Prune):
    """The documented rule: layers < from_layer see every token; score; the kept tokens go on."""
    N, k = len(ids), p.from_layer
    xs = []
    got, seen = np.zeros(N), np.zeros(N)  # attention relative to uniform; queries that saw the token
    for pos, tok in enumerate(ids):
        x = ref.embed(tok)
        for l in range(k):
            x = ref.layer(l, x, pos)
        xs.append(x)
        end = pos + 1
        if p.score == "attention" and (end % CHUNK == 0 or end == N):  # a chunk's last queries
            m, n_q = ref.mass(k - 1, q0=(end - 1) // CHUNK * CHUNK)
            got[:end] += m * end / ref.H
            seen[:end] += n_q
    xs = np.array(xs)
    if p.score == "attention-last":
        m, seen = ref.mass(k - 1)
        got = m * N / ref.H
    if p.score == "recent":
        scores = np.arange(N, dtype=float)
    elif p.score.startswith("attention"):
        scores = got / np.maximum(seen, 1)
    else:
        scores = np.linalg.norm(xs, axis=1) * (-1 if p.score == "low-norm" else 1)
    forced = np.zeros(N, bool)
    forced[:p.sinks] = True
    forced[N - p.keep_last:] = True
    kept = twin_select(scores, forced, math.ceil(p.keep * N))
    for j in kept:
        x = xs[j]
        for l in range(k, ref.L):
            x = ref.layer(l, x, int(j))
    return kept, ref.logits(x)


def _ids(n, seed=0, vocab=TINY_CFG["vocab_size"]):
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


@pytest.mark.parametrize("cache", ["model", "half_model"])
@pytest.mark.parametrize("score", ["recent", "norm", "attention"])
@pytest.mark.parametrize("from_layer", [1, 2])
def test_keep_all_equals_dense(request, cache, score, from_layer):
    model = request.getfixturevalue(cache)
    assert model.session().state.k_cache.dtype == (np.float32 if cache == "model" else np.uint16)
    ids = _ids(150)
    dense = model.session()
    s = model.session(prune=Prune(keep=1.0, from_layer=from_layer, score=score))
    np.testing.assert_array_equal(s.prefill(ids[:140]), dense.prefill(ids[:140]))
    np.testing.assert_array_equal(s.append(ids[140:]), dense.append(ids[140:]))
    np.testing.assert_array_equal(s.decode_step(7), dense.decode_step(7))


@pytest.mark.parametrize("score", ["recent", "norm", "low-norm", "attention", "attention-last"])
def test_pruned_session_matches_numpy_model(model, weights, score):
    N = 150  # three prefill chunks, the last one short
    ids = _ids(N + 7, seed=1)
    p = Prune(keep=0.3, from_layer=2, score=score, sinks=3, keep_last=5)
    s = model.session(prune=p)
    logits = s.prefill(ids[:N])
    ref = RefModel(weights, CFG)
    kept, want = ref_pruned_prefill(ref, ids[:N], p)
    np.testing.assert_array_equal(s._pruning.kept, kept)          # the same tokens, chosen independently
    assert len(kept) == math.ceil(0.3 * N)
    assert set(range(3)) <= set(kept) and set(range(N - 5, N)) <= set(kept)  # sinks and last tokens
    assert list(s._pruning.fill) == [N, N, len(kept)]              # layer 2's cache holds only the kept
    np.testing.assert_allclose(logits, want, atol=2e-4, rtol=1e-4)
    for pos in range(N, N + 7):                                    # decoding after pruning
        np.testing.assert_allclose(s.decode_step(ids[pos]), ref.token(ids[pos], pos), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("keep", [0.01, 0.2])
def test_sinks_and_last_tokens_always_kept(model, keep):
    ids = _ids(200, seed=2)
    for score in ("recent", "norm", "low-norm", "attention", "attention-last"):
        s = model.session(prune=Prune(keep=keep, from_layer=1, score=score, sinks=4, keep_last=10))
        s.prefill(ids)
        kept = set(s._pruning.kept.tolist())
        assert set(range(4)) <= kept and set(range(190, 200)) <= kept
        assert len(kept) == max(14, math.ceil(keep * 200))


def test_recent_score_keeps_the_sinks_and_one_window(model):
    """score="recent" spends the whole budget on the sinks and the prompt's last tokens."""
    ids = _ids(200, seed=4)
    s = model.session(prune=Prune(keep=0.3, from_layer=1, score="recent", sinks=6, keep_last=1))
    s.prefill(ids)
    assert s._pruning.kept.tolist() == list(range(6)) + list(range(200 - 54, 200))  # 60 = ceil(0.3 * 200)


def test_eviction_never_exceeds_budget_and_matches_numpy_model(model, weights, monkeypatch):
    monkeypatch.setattr(fastinfer.prune, "EVICT_QUERIES", 8)  # fewer than the ring's 32
    budget, n_prompt, n_total = 128, 60, 190
    ids = _ids(n_total, seed=3)
    s = model.session(kv_budget=budget)
    assert s.state.k_cache.shape[2] == budget          # the cache itself is only `budget` rows
    ref = RefModel(weights, CFG)
    logits = s.prefill(ids[:n_prompt])
    for pos in range(n_prompt):
        want = ref.token(ids[pos], pos)
    np.testing.assert_allclose(logits, want, atol=2e-4, rtol=1e-4)
    evicted = 0
    for pos in range(n_prompt, n_total):
        for l in range(ref.L):  # the documented rule: overflow -> budget - budget // 8 rows
            if len(ref.cache[l]) > budget - 1:
                ref.evict(l, budget - budget // 8, sinks=4, recent=budget // 4, queries=8)
                evicted += 1
        got = s.decode_step(ids[pos])
        assert s._pruning.fill.max() <= budget
        assert [len(c) for c in ref.cache] == list(s._pruning.fill - 1)
        np.testing.assert_allclose(got, ref.token(ids[pos], pos), atol=3e-4, rtol=1e-4)
    assert evicted >= 3 * ref.L                     # eviction really happened, several times
    assert s.pos == n_total


@pytest.mark.parametrize("cache", ["model", "half_model"])
def test_prune_with_budget_never_exceeds_it(request, cache):
    model = request.getfixturevalue(cache)
    ids = _ids(250, seed=4)
    s = model.session(prune=Prune(keep=0.5, from_layer=1, keep_last=20), kv_budget=128)
    s.prefill(ids[:200])
    assert s._pruning.fill.max() <= 128
    for t in ids[200:]:
        s.decode_step(t)
        assert s._pruning.fill.max() <= 128
    assert np.isfinite(s.decode_step(5)).all()


def test_generate_takes_prune_and_budget(model):
    ids = _ids(100, seed=6)
    dense = model.generate(ids, max_new_tokens=6, temperature=0)
    assert model.generate(ids, max_new_tokens=6, temperature=0, prune=Prune(keep=1.0, from_layer=1)) == dense
    pruned = model.generate(ids, max_new_tokens=6, temperature=0, kv_budget=128,
                            prune=Prune(keep=0.3, from_layer=1, keep_last=16))
    assert len(pruned) == 6
    text = model.generate("hello world", max_new_tokens=3, temperature=0, prune=Prune(from_layer=1))
    assert isinstance(text, str)


def test_reset_forgets_pruning(model):
    ids = _ids(120, seed=7)
    s = model.session(prune=Prune(keep=0.4, from_layer=1, keep_last=10), kv_budget=128)
    a = s.prefill(ids)
    s.reset()
    np.testing.assert_array_equal(s.prefill(ids), a)


@pytest.mark.parametrize("kw,match", [
    (dict(keep=0.0), "keep"), (dict(keep=1.5), "keep"), (dict(keep="half"), "keep"),
    (dict(from_layer=0), "from_layer"), (dict(from_layer=1.5), "from_layer"),
    (dict(score="energy"), "score"), (dict(sinks=-1), "sinks"), (dict(keep_last=0), "keep_last"),
])
def test_bad_prune_options(kw, match):
    with pytest.raises(ValueError, match=match):
        Prune(**kw)


def test_bad_session_options(model):
    with pytest.raises(ValueError, match="below the model's 3 layers"):
        model.session(prune=Prune(from_layer=3))
    with pytest.raises(ValueError, match="prune must be"):
        model.session(prune=0.5)
    for bad in (64, 200.0, True):
        with pytest.raises(ValueError, match="kv_budget"):
            model.session(kv_budget=bad)
    with pytest.raises(ValueError, match="beam"):
        model.generate(_ids(10), max_new_tokens=2, num_beams=2, prune=Prune(from_layer=1))
    with pytest.raises(ValueError, match="batch"):
        model.generate([_ids(10), _ids(12)], max_new_tokens=2, kv_budget=128)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def test_cli_generate_with_pruning_flags(model, capsys):
    from fastinfer.cli import main
    src = str(model.source)
    args = ["generate", "hello world " * 20, "-m", src, "-n", "4", "--temperature", "0", "--ctx", "256"]
    assert main(args) == 0
    dense = capsys.readouterr().out
    assert main(args + ["--prune-keep", "1.0", "--prune-from-layer", "1"]) == 0
    assert capsys.readouterr().out == dense                        # keep=1.0 is dense
    assert main(args + ["--prune-keep", "0.3", "--prune-from-layer", "2", "--prune-score", "norm",
                        "--prune-sinks", "2", "--prune-keep-last", "8", "--kv-budget", "128"]) == 0
    assert capsys.readouterr().out.startswith("hello world")
    for bad, match in ((["--prune-keep", "2"], "keep"), (["--kv-budget", "5"], "kv_budget"),
                       (["--prune-from-layer", "3"], "from_layer"), (["--prune-sinks", "-1"], "sinks"),
                       (["--prune-keep-last", "0"], "keep_last")):
        assert main(args + bad) == 1
        assert match in capsys.readouterr().err


def test_cli_eval_prune_writes_table_and_plot(model, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastinfer.cli import main
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and some more text {i % 11}" for i in range(200)))
    out = tmp_path / "res"
    code = main(["eval-prune", str(text), "-m", str(model.source), "--contexts", "32,64", "--keep", "0.5,1.0",
                 "--scores", "norm", "--from-layer", "1", "-r", "2", "--next", "16", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    table = (tmp_path / "res.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 32 |") or line.startswith("| 64 |")]
    assert len(rows) == 4 and all(" ± " in r for r in rows)
    assert all("+0.0% | 100.0% |" in r for r in rows if "keep=1.0" in r)  # keep 1.0: dense quality
    assert (tmp_path / "res.png").stat().st_size > 1000
    assert main(["eval-prune", str(text), "-m", str(model.source), "--scores", "energy"]) == 1
    assert "score" in capsys.readouterr().err


def test_cli_eval_prune_pools_quality_over_files(model, tmp_path, capsys):
    from fastinfer.cli import main
    from fastinfer.evaluate import continuation
    texts = []
    for k, words in enumerate(("alpha beta gamma", "one two three four five")):
        p = tmp_path / f"t{k}.txt"
        p.write_text(" ".join(f"{words} {i % (13 + k)} more" for i in range(150)))
        texts.append(p)
    out = tmp_path / "pooled"
    code = main(["eval-prune", *map(str, texts), "-m", str(model.source), "--contexts", "48", "--keep", "0.5,1.0",
                 "--scores", "norm", "--from-layer", "1", "-r", "1", "--next", "16", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = {line.split(" | ")[1]: line for line in (tmp_path / "pooled.md").read_text().splitlines()
            if line.startswith("| 48 |")}
    assert "+0.0%, +0.0% | 100.0% |" in rows["norm keep=1.0"]
    # the pooled change is exp(mean NLL pruned - mean NLL dense) over both texts' scored tokens
    nll = {}
    for keep in (None, 0.5):
        opts = {} if keep is None else {"prune": Prune(keep=keep, from_layer=1, score="norm")}
        nll[keep] = [continuation(model, model.tokenizer.encode(t.read_text(), add_special_tokens=False).ids, 48, 16,
                                  **opts).nll for t in texts]
    want = math.exp(np.mean(nll[0.5]) - np.mean(nll[None])) - 1
    each = ", ".join(f"{math.exp(a - b) - 1:+.1%}" for a, b in zip(nll[0.5], nll[None]))
    assert f" {want:+.1%} | {each} |" in rows["norm keep=0.5"]
