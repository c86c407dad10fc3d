"""The serving engine without HTTP: where a continuous-batching step's time goes.

    python bench/serve_engine.py --parallel 8 [--requests 40] [--model M] [--threads 2]

`parallel` slots are kept full with greedy chat requests of --max-tokens each (prompts cycling
through serve_load.py's 8 questions; a finished request is replaced at once). After a warm-up of
`parallel` requests, prints generated tokens/s and, per engine step, the milliseconds inside
`Batch.decode` and the rest (prefill chunks of admitted prompts, sampling, detokenizing). With
bench/serve_load.py's figures this separates the model step from the HTTP server's cost.
"""
import argparse
import time

import fastinfer
from fastinfer.sampling import SamplingParams
from fastinfer.serving import Engine, Request

PROMPTS = [
    "Explain why the sky is blue.", "Write a short story about a robot learning to paint.",
    "List five uses of a paperclip.", "What is the difference between a virus and a bacterium?",
    "Describe a sunrise over the sea.", "Give advice to a new programmer.",
    "Summarize the plot of a heist movie you invent.", "Why do cats purr?",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--requests", type=int, default=None, help="measured requests (default 4 x parallel)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    P = args.parallel
    N = P + (args.requests or 4 * P)
    model = fastinfer.load(args.model, threads=args.threads, n_ctx=2048)
    engine = Engine(model, P, 2048, background=False)
    ids = [model.tokenizer.encode(model.apply_chat_template([{"role": "user", "content": p}])).ids for p in PROMPTS]
    state = {"sent": 0, "done": 0, "tokens": 0}

    def send():
        i = state["sent"]
        state["sent"] += 1
        engine.submit(Request(ids=list(ids[i % len(ids)]), max_tokens=args.max_tokens,
                              params=SamplingParams(temperature=0.0), emit=on_event))

    def on_event(ev):
        if ev[0] == "text":
            state["tokens"] += 1
        elif ev[0] == "done":
            state["done"] += 1
            if state["sent"] < N:
                send()

    for _ in range(P):
        send()
    while state["done"] < P:  # warm-up
        engine._step()
    t0, d0, k0, steps = time.perf_counter(), engine.stats.decode_seconds, state["tokens"], 0
    s0 = engine.stats.decode_steps
    while state["done"] < N:
        engine._step()
        steps += 1
    dt = time.perf_counter() - t0
    dd, ds = engine.stats.decode_seconds - d0, engine.stats.decode_steps - s0
    print(f"parallel {P}: {(state['tokens'] - k0) / dt:.1f} generated tok/s over {N - P} requests; per step "
          f"{1e3 * dt / steps:.2f} ms: {1e3 * dd / ds:.2f} in Batch.decode, {1e3 * (dt - dd) / steps:.2f} the rest")


if __name__ == "__main__":
    main()
