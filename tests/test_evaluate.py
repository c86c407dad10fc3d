"""The continuation protocol (fastinfer/evaluate.py) on a tiny random model."""
import math

import numpy as np
import pytest

import fastinfer
from fastinfer.evaluate import compare, continuation, markdown_table
from fastinfer.perplexity import token_nll
from tiny_models import TINY_CFG, random_llama_weights, tiny_bpe_tokenizer, write_hf_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    w = random_llama_weights(TINY_CFG)
    return fastinfer.load(write_hf_dir(d / "hf", TINY_CFG, w, tokenizer=tiny_bpe_tokenizer()), n_ctx=64)


def test_continuation_scores_the_true_next_tokens(model):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.args.vocab_size, 50)
    c = continuation(model, ids, context=30, n_next=12)
    logits = model.forward(ids[:42].tolist())              # full pass, no cache reuse
    want = token_nll(logits[29:41], ids[30:42]).mean()     # logits at i predict token i + 1
    assert math.isclose(c.nll, want, rel_tol=1e-5)
    assert np.array_equal(c.top1, logits[29:41].argmax(axis=1))


def test_steps_score_the_same_tokens_one_call_each(model):
    """steps=True feeds the scored tokens as decode steps; dense, that is the same computation, and
    under BlockSparse(dense_last=1) each step attends densely where a chunk would follow the pattern."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.args.vocab_size, 50)
    a, b = continuation(model, ids, 30, 12), continuation(model, ids, 30, 12, steps=True)
    assert math.isclose(a.nll, b.nll, rel_tol=1e-5) and np.array_equal(a.top1, b.top1)
    sparse = fastinfer.BlockSparse(block=4, global_blocks=0, local_blocks=0, dense_last=1)
    chunked = continuation(model, ids, 30, 12, attention=sparse)
    stepped = continuation(model, ids, 30, 12, steps=True, attention=sparse)
    assert not math.isclose(chunked.nll, stepped.nll, rel_tol=1e-4)


def test_compare_dense_with_itself(model):
    ids = np.arange(40) % model.args.vocab_size
    a = continuation(model, ids, 20, 10)
    r = compare("same", a, a)
    assert r.top1_agreement == 1.0 and r.ppl_change == 0.0 and r.speedup == 1.0
    assert "| 20 | same |" in markdown_table([r])


def test_text_too_short(model):
    with pytest.raises(ValueError, match="needs 40"):
        continuation(model, list(range(30)), 20, 20)
