"""Time to first token of a chat's second turn against its first, through `fastinfer serve`.

    python bench/serve_prompt_cache.py --history 1000 --runs 5

Each run sends a first turn whose user message is --history tokens of a novel (tests/data/corpus),
then a second turn: that history, the assistant's answer and a short question. The second turn
finds the first turn's tokens in the slot's cache; the same second turn with cache_prompt=false
prefills everything. Streaming, greedy, --max-tokens each; mean ± std of the time to first token
over --runs histories (each from another place in the book). One JSON line.
"""
import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import _free_port, start  # noqa: E402

BOOK = Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus" / "persuasion.txt.gz"


def ttft(url: str, messages: list, max_tokens: int, cache: bool) -> tuple[float, str]:
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "cache_prompt": cache}
    t0 = time.perf_counter()
    first, text = None, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                d = json.loads(line[6:])
                piece = d["choices"][0]["delta"].get("content") if d["choices"] else None
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    return (first or time.perf_counter()) - t0, "".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: the default model)")
    ap.add_argument("--history", type=int, default=1000, help="tokens of book in the first turn")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import fastinfer
    from fastinfer.weights.fetch import default_model
    args.model = args.model or str(default_model())
    tok = fastinfer.load(args.model, n_ctx=256).tokenizer  # only to cut the book into token counts
    words = gzip.decompress(BOOK.read_bytes()).decode().split()
    serve_args = argparse.Namespace(model=args.model, threads=args.threads, parallel=2, ctx=4096)
    port = _free_port()
    p = start("fastinfer", serve_args, port)
    url = f"http://127.0.0.1:{port}"
    first, second, fresh = [], [], []
    try:
        for run in range(args.runs + 1):  # run 0 warms up
            at = 10000 + 3000 * run
            n = args.history
            while len(tok.encode(" ".join(words[at:at + n]), add_special_tokens=False).ids) > args.history:
                n -= 10
            history = [{"role": "user", "content": "Read this: " + " ".join(words[at:at + n])}]
            t1, answer = ttft(url, history, args.max_tokens, True)
            turn2 = history + [{"role": "assistant", "content": answer},
                               {"role": "user", "content": "Who is mentioned first?"}]
            t2, _ = ttft(url, turn2, args.max_tokens, True)
            t3, _ = ttft(url, turn2, args.max_tokens, False)
            if run:
                first.append(t1), second.append(t2), fresh.append(t3)
    finally:
        p.terminate()
        p.wait(30)
    ms = lambda xs: f"{1000 * statistics.mean(xs):.1f} ± {1000 * statistics.stdev(xs):.1f}"  # noqa: E731
    print(json.dumps({"history_tokens": args.history, "runs": args.runs, "ttft_first_ms": ms(first),
                      "ttft_second_cached_ms": ms(second), "ttft_second_uncached_ms": ms(fresh),
                      "ratio_second_to_first": round(statistics.mean(second) / statistics.mean(first), 3)}))


if __name__ == "__main__":
    main()
