"""What a prompt-lookup draft's check costs, as a share of one decode step.

    python bench/check_cost.py [--positions 150 400 800] [--sizes 2 3 4 5 6 7 8] [-r 40] [--model M]

At each position a session is prefilled that far; then a decode step and a check of each size
(`Session.verify`: T tokens, all T rows of logits) run in turn, each from the same position, -r
times. Prints the decode step's median time and each check's median as a multiple of it (the
first 5 rounds are warm-up).
"""
import argparse
import statistics
import time

import fastinfer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--positions", type=int, nargs="+", default=[150, 400, 800])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("-r", "--repetitions", type=int, default=40)
    args = ap.parse_args()
    model = fastinfer.load(args.model, threads=args.threads)
    ids = model.encode("It is a truth universally acknowledged. " * 200)
    room = min(len(ids), model.n_ctx) - max(args.sizes)
    if max(args.positions) > room or min(args.positions) < 1 or min(args.sizes) < 2:
        raise SystemExit(f"check_cost: positions must lie in 1..{room} and sizes be at least 2")
    print("| position | decode step | " + " | ".join(str(n) for n in args.sizes) + " |")
    print("|---:|---:|" + "---:|" * len(args.sizes))
    for pos in args.positions:
        s = model.session(n_ctx=pos + max(args.sizes))
        s.prefill(ids[:pos])
        times = {n: [] for n in [1] + args.sizes}
        for _ in range(args.repetitions + 5):
            for n in times:
                s.rewind(pos)
                t0 = time.perf_counter()
                if n == 1:
                    s.decode_step(ids[pos])
                else:
                    s.verify(ids[pos:pos + n])
                times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(v[5:]) for n, v in times.items()}
        print(f"| {pos} | {med[1] * 1e3:.2f} ms | " + " | ".join(f"{med[n] / med[1]:.2f}" for n in args.sizes) + " |")


if __name__ == "__main__":
    main()
