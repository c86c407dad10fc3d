"""Prompt-lookup decoding through the serving engine (no HTTP): one request at a time, as a server
with one busy slot runs it, on `fastinfer bench --prompt-lookup`'s built-in prompts.

    python bench/serve_lookup.py [--lookup 3] [-n 128] [-r 3] [--model M] [--threads 2]

Per prompt: decode tokens/s after the first token with drafts of up to --lookup tokens and
without (alternated, warm-up excluded; mean ± std over -r runs), drafted tokens taken, and whether
the two texts are identical.
"""
import argparse
import statistics
import time

import fastinfer
from fastinfer.lookup_bench import builtin_prompts
from fastinfer.sampling import SamplingParams
from fastinfer.serving import Engine, Request


def run(engine: Engine, ids: list[int], n: int, lookup: int) -> tuple[str, float, Request]:
    """(text, decode tokens/s after the first token, the finished request)."""
    parts, first = [], []

    def emit(ev):
        if ev[0] == "text":
            parts.append(ev[1])
            if not first:
                first.append(time.perf_counter())
    # cache_prompt=False: every run prefills the same way, so both sides see the same prompt cache
    r = Request(ids=list(ids), max_tokens=n, params=SamplingParams(temperature=0.0), emit=emit,
                cache_prompt=False, lookup=lookup)
    engine.submit(r)
    while engine.busy_slots() or engine.queue:
        engine._step()
    return "".join(parts), (r.completion_tokens - 1) / (time.perf_counter() - first[0]), r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--lookup", type=int, default=3, help="draft tokens (default: %(default)s)")
    ap.add_argument("-n", type=int, default=128, help="generated tokens per request (default: %(default)s)")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = fastinfer.load(args.model, threads=args.threads, n_ctx=2048)
    engine = Engine(model, 1, 2048, background=False)
    run(engine, model.encode("Hello there"), 8, args.lookup)  # warm-up: compiles the verification call
    print(f"| set | prompt | prompt tokens | plain tok/s | lookup tok/s | speed-up | drafts taken | identical |\n"
          f"|---|---|---:|---:|---:|---:|---:|---|")
    for kind, prompts in builtin_prompts().items():
        for name, text in prompts:
            ids = model.tokenizer.encode(model.apply_chat_template([{"role": "user", "content": text}])).ids
            plain, fast, same, req = [], [], True, None
            for _ in range(args.repetitions):
                a, ta, _ = run(engine, ids, args.n, 0)
                b, tb, req = run(engine, ids, args.n, args.lookup)
                plain.append(ta)
                fast.append(tb)
                same = same and a == b
            sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
            print(f"| {kind} | {name} | {len(ids)} | {statistics.mean(plain):.1f} ± {sd(plain):.1f} | "
                  f"{statistics.mean(fast):.1f} ± {sd(fast):.1f} | {statistics.mean(fast) / statistics.mean(plain):.2f} | "
                  f"{req.accepted_tokens}/{req.drafted_tokens} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
