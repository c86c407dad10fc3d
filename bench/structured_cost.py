"""What JSON-schema output costs per token: llguidance's mask and token update, against the decode
step they ride along.

    python bench/structured_cost.py [--model M] [--tokens 64] [--runs 5]

Greedy generation under a schema; each token's copy into the work row + mask + argmax + accept time
and decode step time are summed separately (the same tokens, the same process). Mean ± std over --runs of the share
(mask + accept) / decode step. One JSON line.
"""
import argparse
import json
import statistics
import time

import numpy as np

import fastinfer
from fastinfer.structured import JsonConstraint, json_schema_grammar

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "hobbies", "bio"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                         "hobbies": {"type": "array", "items": {"type": "string"}}, "bio": {"type": "string"}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    model = fastinfer.load(args.model)
    grammar = json_schema_grammar(SCHEMA)
    ids = model.encode("Describe a person as JSON:")
    shares, per_token_us = [], []
    for run in range(args.runs + 1):  # run 0 warms up
        c = JsonConstraint(model, grammar)
        s = model.session(len(ids) + args.tokens + 1)
        logits = s.prefill(ids)
        t_mask = t_step = 0.0
        n = 0
        row = np.empty(model.args.vocab_size, np.float32)  # TokenChooser's work row, reused
        while n < args.tokens and not c.finished:
            t0 = time.perf_counter()
            np.copyto(row, logits)
            c.mask(row)
            tok = int(np.argmax(row))
            c.accept(tok)
            t1 = time.perf_counter()
            logits = s.decode_step(tok)
            t2 = time.perf_counter()
            t_mask += t1 - t0
            t_step += t2 - t1
            n += 1
        if run:
            shares.append(t_mask / t_step)
            per_token_us.append(1e6 * t_mask / n)
    print(json.dumps({"model": str(model.source), "vocab": model.args.vocab_size, "tokens": args.tokens,
                      "mask_us_per_token": f"{statistics.mean(per_token_us):.0f} ± {statistics.stdev(per_token_us):.0f}",
                      "share_of_decode_step": f"{statistics.mean(shares):.3f} ± {statistics.stdev(shares):.3f}"}))


if __name__ == "__main__":
    main()
