"""Check that every engine bench/compare.py times computes the same model, before timing it.

    python bench/verify_engines.py          # needs fastinfer; checks whichever other engines import

On one English text prompt, the logits of every position are compared with HF transformers
float32 on the exported folder (bench/export_hf.py), the reference: fastinfer f32 (reading the
GGUF itself, so its reader and forward pass are checked), CTranslate2 float32 and int8
(`Generator.forward_batch`). Then every engine continues "The capital of France is" greedily,
as compare.py's loops do (llama.cpp on the Q4_1 file too), and the continuations are printed side
by side with their first disagreement with HF. Last, perplexity on a few 512-token stretches of
the Austen novels in tests/data/corpus, for every engine that returns all positions' logits.

Exits 1 if fastinfer f32 or CTranslate2 float32 stray from HF by more than --tol in any logit,
if an engine's tokenizer disagrees with fastinfer's, or if an engine does not continue with
" Paris". Quantized engines are reported, not judged: their logits are expected to move.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import export_hf

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his "
        "father had taught him. At the top he trimmed the wick, polished the great lens, and watched the "
        "ships pass beyond the rocks until the morning light made the lamp unnecessary.")
PARIS = "The capital of France is"


def greedy_fastinfer(m, ids: list[int], n: int) -> list[int]:
    s = m.session(n_ctx=len(ids) + n)
    logits, out = s.prefill(ids), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = s.decode_step(out[-1])
    return out


def mean_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] under logits (T, vocab) of ids."""
    lg = logits[:-1].astype(np.float64)
    top = lg.max(-1)
    lse = top + np.log(np.exp(lg - top[:, None]).sum(-1))
    return float(np.mean(lse - lg[np.arange(len(ids) - 1), ids[1:]]))


def corpus_chunks(encode, n: int, length: int = 512) -> list[list[int]]:
    """n stretches of `length` tokens from the Austen novels in tests/data/corpus (past the front matter)."""
    import gzip
    files = sorted((Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus").glob("*.txt.gz"))
    if not files:
        raise FileNotFoundError("tests/data/corpus/*.txt.gz not found (needed by --ppl)")
    chunks = []
    for i in range(n):
        ids = encode(gzip.decompress(files[i % len(files)].read_bytes()).decode()[:40000])
        start = 1000 + (i // len(files)) * length
        chunks.append(ids[start:start + length])
    return chunks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="the GGUF (default: $FASTINFER_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument("--threads", "-t", type=int, default=2, help="threads for every engine (default: 2)")
    ap.add_argument("-n", "--n-gen", type=int, default=24, help="greedy tokens per engine (default: 24)")
    ap.add_argument("--tol", type=float, default=2e-3,
                    help="largest |logit difference| allowed between float32 engines and HF (default: 2e-3)")
    ap.add_argument("--ppl", type=int, default=3, metavar="N",
                    help="also report perplexity on N 512-token stretches of tests/data/corpus (default: 3; 0: skip)")
    args = ap.parse_args(argv)
    gguf = args.model or export_hf.cache_home() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        ap.error(f"--model: {gguf} is not a file (expected a llama GGUF)")

    import fastinfer
    failures: list[str] = []
    # name -> (forward: ids -> logits (T, vocab), greedy: (ids, n) -> n token ids)
    engines: dict = {}
    fi = fastinfer.load(gguf, dtype="f32", threads=args.threads, n_ctx=512)
    fi8 = fastinfer.load(gguf, dtype="int8", threads=args.threads, n_ctx=512, activations="f32")
    models = [("fastinfer f32", fi), ("fastinfer int8", fi8)]
    default = fastinfer.load(gguf, threads=args.threads, n_ctx=512)  # what load() gives on this CPU
    if default.activations == "int8":
        models.append(("fastinfer default", default))  # the file's blocks, 8-bit activations
    for name, m in models:
        engines[name] = (m.forward, lambda ids, n, m=m: greedy_fastinfer(m, ids, n))
    ids, q = fi.encode(TEXT), fi.encode(PARIS)
    print(f"prompt: {len(ids)} tokens; continuation prompt {q}")

    reference = None
    try:
        import torch
        import transformers
    except ImportError:
        print("HF transformers: not importable, so nothing is compared with it")
    else:
        torch.set_num_threads(args.threads)
        hf_dir = export_hf.hf_model(gguf)
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        for text, want in ((TEXT, ids), (PARIS, q)):
            got = tok(text, add_special_tokens=True)["input_ids"]
            if got != want:
                failures.append(f"HF tokenizer gives {got[:12]}... for {text[:30]!r}; fastinfer {want[:12]}...")
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

        def hf_forward(x):
            with torch.inference_mode():
                return hf(torch.tensor([x])).logits[0].numpy()

        def hf_greedy(x, n):
            with torch.inference_mode():
                out = hf.generate(torch.tensor([x]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=fi.eos_ids[0])
            return out[0, len(x):].tolist()
        reference = "transformers f32"
        engines[reference] = (hf_forward, hf_greedy)

    try:
        import ctranslate2
    except ImportError:
        print("CTranslate2: not importable, skipped")
    else:
        token = fi.tokenizer.id_to_token
        for quant in export_hf.CT2_QUANTIZATIONS:
            g = ctranslate2.Generator(str(export_hf.ct2_model(gguf, quant)), compute_type=quant,
                                      intra_threads=args.threads, inter_threads=1)

            def ct2_greedy(x, n, g=g):
                r = g.generate_batch([[token(i) for i in x]], max_length=n, min_length=n,
                                     include_prompt_in_result=False, sampling_topk=1)
                return list(r[0].sequences_ids[0])
            engines[f"ctranslate2 {quant}"] = (lambda x, g=g: np.asarray(g.forward_batch([x]))[0], ct2_greedy)

    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: llama-cpp-python not importable, skipped")
    else:
        llm = llama_cpp.Llama(model_path=str(gguf), n_threads=args.threads, n_ctx=256, verbose=False)
        if llm.tokenize(PARIS.encode(), add_bos=False, special=True) != q:
            failures.append("llama.cpp tokenizes the continuation prompt differently from fastinfer")

        def llama_greedy(x, n):
            out = []
            llm.reset()  # empty the KV cache too, as compare.py's LlamaCppRunner does
            ctx = llm._ctx
            ctx.memory_clear(True) if hasattr(ctx, "memory_clear") else ctx.kv_cache_clear()
            llm.eval(list(x))
            for _ in range(n):
                out.append(int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)))))
                llm.eval([out[-1]])
            return out
        engines["llama.cpp Q4_1"] = (None, llama_greedy)  # logits of one position per call only

    if reference:
        ref = engines[reference][0](ids)
        print(f"\nlogits vs {reference} over {len(ids)} positions (largest |logit| {np.abs(ref).max():.1f}):")
        print(f"  {'engine':<20} {'max |diff|':>11} {'mean |diff|':>12} {'top-1 agrees':>13}")
        for name, (forward, _) in engines.items():
            if forward is None or name == reference:
                continue
            lg = forward(ids)
            d = np.abs(lg - ref)
            agree = float(np.mean(lg.argmax(-1) == ref.argmax(-1)))
            print(f"  {name:<20} {d.max():11.2e} {d.mean():12.2e} {agree:13.1%}")
            if name in ("fastinfer f32", "ctranslate2 float32") and d.max() > args.tol:
                failures.append(f"{name} logits differ from HF's by up to {d.max():.2e} (--tol {args.tol})")

    conts = {name: greedy(q, args.n_gen) for name, (_, greedy) in engines.items()}
    print(f"\ngreedy continuations of {PARIS!r} ({args.n_gen} tokens):")
    base = conts[reference or "fastinfer f32"]
    for name, c in conts.items():
        diverge = next((i for i, (a, b) in enumerate(zip(c, base)) if a != b), None)
        where = "same as reference" if diverge is None else f"differs from token {diverge} on"
        print(f"  {name:<20} {where:<24} {fi.decode(c)!r}")
        if fi.decode(c[:1]) != " Paris":
            failures.append(f"{name} continues with {fi.decode(c[:1])!r}, not ' Paris'")

    if args.ppl:
        chunks = corpus_chunks(fi.encode, args.ppl)
        base_name = reference or "fastinfer f32"
        nll = {name: [mean_nll(f(c), c) for c in chunks] for name, (f, _) in engines.items() if f is not None}
        base_ppl = float(np.exp(np.mean(nll[base_name])))
        print(f"\nperplexity on {len(chunks)} x {len(chunks[0])} tokens of tests/data/corpus (vs {base_name}):")
        for name, v in nll.items():
            p = float(np.exp(np.mean(v)))
            print(f"  {name:<20} {p:8.3f}  {(p / base_ppl - 1) * 100:+6.2f}%")

    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    print("\nall checks passed" if not failures else f"\n{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
