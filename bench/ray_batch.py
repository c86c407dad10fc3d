"""Batch generation over a fixed set of prompts: Ray Data actors against one process.

    python bench/ray_batch.py single --batch-sizes 8,16,32        # Model.generate(list) in one process
    python bench/ray_batch.py program --batch-sizes 200           # the same as a whole program per run
    python bench/ray_batch.py versus --threads 2 --batch-size 200  # loaded, program, Ray, alternating
    python bench/ray_batch.py ray --actors 2 --threads 1 --batch-size 16
    python bench/ray_batch.py ray --actors 1 --threads 2 --batch-size 16
    python bench/ray_batch.py ray --nodes 2 --actors 2 --threads 1 --batch-size 100

Both run the same --prompts prompts (built from fixed subjects and openings), greedy, --max-tokens
each, and report generated tokens per second as mean ± std over --repeat runs after one warm-up
run. `single` loads the model once (threads = all cores) and decodes the prompts in batches of
each --batch-sizes. `program` runs `single` as a whole new Python process per repetition (start,
import, load the model, generate, exit), the end-to-end cost of a one-process batch job to set
beside Ray's whole pass; `versus` alternates a process that holds the model (the batch alone),
one such program and one Ray Data pass (--actors actors of --threads threads, workers at
--worker-niceness) in one run, as this VM's speed drifts.
`ray` starts a local cluster of --cpus CPUs (split among --nodes raylets on this host, as on a
multi-node cluster) and runs a whole `map_batches(Predictor, ...)` pass per repetition, new actors
each time, so a run's wall time includes starting the actors and loading the model; `span` is the
time from the first batch's start to the last batch's end inside the actors, without that start-up. One JSON line per
repetition; --out appends them to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SUBJECTS = ["the ocean", "a small village", "the history of Rome", "machine learning", "a lost dog",
            "the moon landing", "bread baking", "a rainy afternoon", "chess strategy", "volcanoes",
            "the printing press", "a city at night", "honey bees", "the violin", "desert travel",
            "a mountain lake", "electric cars", "ancient Egypt", "a winter market", "the human heart",
            "coral reefs", "a train journey", "photosynthesis", "a chess club", "the first computers"]
OPENINGS = ["Write a short story about {}.", "Explain {} to a child.", "Here is an essay about {}:",
            "Describe {} in detail.", "Five facts about {}:", "A poem about {}:",
            "The most surprising thing about {} is", "Once upon a time, {}"]


def prompts(n: int) -> list[str]:
    every = [o.format(s) for o in OPENINGS for s in SUBJECTS]
    return [every[i % len(every)] for i in range(n)]


def summary(label: str, runs: list[dict], key: str = "tokens_per_s") -> str:
    xs = [r[key] for r in runs]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{label}: {statistics.mean(xs):.1f} ± {sd:.1f} {key.replace('_per_s', '/s')} over {len(xs)} runs"


def emit(row: dict, out: str | None) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def record(runs: list, out: str | None, rep: int, tokens: int, seconds: float, **fields) -> None:
    """One repetition's JSON line (repetition 0 is the warm-up, not kept in `runs`)."""
    row = {**fields, "rep": rep, "tokens": tokens, "seconds": round(seconds, 3),
           "tokens_per_s": round(tokens / seconds, 2)}
    if rep:
        runs.append(row)
    emit({**row, "warmup": rep == 0}, out)


def run_single(args) -> None:
    import fastinfer
    from fastinfer.kernels import isa
    model = fastinfer.load(args.model, threads=args.threads)
    ps = prompts(args.prompts)
    ids = [model.encode(p) for p in ps]
    model.generate(ids[:2], max_new_tokens=4, temperature=0)  # JIT / page-cache warm-up
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        runs = []
        for rep in range(args.repeat + 1):
            t0 = time.perf_counter()
            tokens = 0
            for k in range(0, len(ids), bs):
                tokens += sum(len(o) for o in model.generate(ids[k:k + bs], max_new_tokens=args.max_tokens,
                                                             temperature=0))
            seconds = time.perf_counter() - t0
            record(runs, args.out, rep, tokens, seconds, bench="single", batch_size=bs, threads=model.threads,
                   prompts=len(ids), tier=isa.TIER.name)
        print(summary(f"single process, threads {model.threads}, batch {bs}", runs), file=sys.stderr)


def run_program(args) -> None:
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        code, runs = _program_code(args, bs, args.threads), []
        for rep in range(args.repeat + 1):
            n_threads, tokens, seconds = _program_once(code)
            record(runs, args.out, rep, tokens, seconds, bench="program", batch_size=bs, threads=n_threads,
                   prompts=args.prompts)
        print(summary(f"one program per run, threads {n_threads}, batch {bs}", runs), file=sys.stderr)


def _setup_code(args, threads) -> str:
    """Python that loads the model as `m` and encodes the prompts as `ids`."""
    here = os.path.dirname(os.path.abspath(__file__))
    threads = "None" if threads is None else int(threads)
    return (f"import sys, time; sys.path.insert(0, {here!r}); import fastinfer; from ray_batch import prompts\n"
            f"m = fastinfer.load({args.model!r}, threads={threads})\n"
            f"ids = [m.encode(p) for p in prompts({args.prompts})]\n")


def _generated_expr(args, bs: int) -> str:
    """Python for the tokens generated by decoding `ids` greedily in batches of bs."""
    return (f"sum(len(o) for k in range(0, len(ids), {bs}) "
            f"for o in m.generate(ids[k:k + {bs}], max_new_tokens={args.max_tokens}, temperature=0))")


def _program_code(args, bs: int, threads) -> str:
    """Python for one whole one-process batch job; prints its threads and generated tokens."""
    return _setup_code(args, threads) + f"print(m.threads, {_generated_expr(args, bs)})\n"


def _program_once(code: str) -> tuple[int, int, float]:
    """(threads, tokens, seconds) of one program run, in a new process."""
    import subprocess
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(done.stderr)
    threads, tokens = map(int, done.stdout.split()[-2:])
    return threads, tokens, seconds


class _Loaded:
    """A process that holds the model (threads = the cluster's CPUs) and, on each request, decodes
    the prompts in batches of `bs` and reports its tokens and seconds: the best single-process run,
    set beside each Ray pass in `versus` (idle, blocked on its stdin, while Ray runs)."""

    def __init__(self, args, bs: int):
        import subprocess
        code = (_setup_code(args, args.cpus) +
                "m.generate(ids[:2], max_new_tokens=4, temperature=0)\n"
                "print(m.threads, flush=True)\n"
                "for _ in sys.stdin:\n"
                "    t0 = time.perf_counter()\n"
                f"    n = {_generated_expr(args, bs)}\n"
                "    print(n, time.perf_counter() - t0, flush=True)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.threads = int(self.proc.stdout.readline())

    def run(self) -> tuple[int, float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        tokens, seconds = self.proc.stdout.readline().split()
        return int(tokens), float(seconds)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run_ray(args) -> None:
    import ray
    import ray.data

    from fastinfer.kernels import isa
    from fastinfer.ray import Predictor

    class Timed(Predictor):
        """Predictor plus each batch's start and end (wall clock, comparable across processes)."""
        def __call__(self, batch):
            t0 = time.time()
            out = super().__call__(batch)
            return {**out, "t0": [t0] * len(out["output"]), "t1": [time.time()] * len(out["output"])}

    # Ray starts its workers at nice 15 unless told otherwise; at 15 every wake-up of the raylet,
    # the GCS or the driver preempts a kernel thread and stalls its whole OpenMP team.
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    nodes = None
    if args.nodes < 1:
        sys.exit(f"--nodes must be at least 1; got {args.nodes}")
    if args.nodes > 1:  # raylets of their own on this host, as on a multi-node cluster
        from ray.cluster_utils import Cluster
        if args.cpus % args.nodes:
            sys.exit(f"--cpus {args.cpus} does not divide among {args.nodes} nodes")
        nodes = Cluster(initialize_head=True,
                        head_node_args={"num_cpus": args.cpus // args.nodes, "include_dashboard": False})
        for _ in range(args.nodes - 1):
            nodes.add_node(num_cpus=args.cpus // args.nodes)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ps = prompts(args.prompts)
    source = ray.data.from_items([{"prompt": p} for p in ps]).repartition(
        target_num_rows_per_block=args.batch_size).materialize()
    runs, programs, loaded_runs = [], [], []
    versus = args.mode == "versus"
    whole = args.batch_size * args.actors  # the single process decodes what all the actors do, at once
    code = _program_code(args, whole, args.cpus)
    loaded = _Loaded(args, whole) if versus else None
    for rep in range(args.repeat + 1):
        if versus:  # the model already loaded in one process, then the one-process program, on the same cores
            tokens, seconds = loaded.run()
            record(loaded_runs, args.out, rep, tokens, seconds, bench="loaded", batch_size=whole,
                   threads=loaded.threads, prompts=len(ps))
            n_threads, tokens, seconds = _program_once(code)
            record(programs, args.out, rep, tokens, seconds, bench="program", batch_size=whole, threads=n_threads,
                   prompts=len(ps))
        # The previous run's actors give their CPUs back asynchronously: a new pool started before
        # they do waits, and its wall time would count the wait.
        deadline = time.time() + 120
        while ray.available_resources().get("CPU", 0) < args.cpus and time.time() < deadline:
            time.sleep(0.2)
        t0 = time.perf_counter()
        ds = source.map_batches(Timed, batch_size=args.batch_size, num_cpus=args.threads,
                                compute=ray.data.ActorPoolStrategy(size=args.actors, max_tasks_in_flight_per_actor=1),
                                fn_constructor_kwargs=dict(model=args.model, threads=args.threads,
                                                           max_tokens=args.max_tokens, temperature=0))
        tokens, first, last = 0, float("inf"), 0.0
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            tokens += int(batch["output_tokens"].sum())
            first, last = min(first, float(batch["t0"].min())), max(last, float(batch["t1"].max()))
        seconds = time.perf_counter() - t0
        span = last - first
        record(runs, args.out, rep, tokens, seconds, bench="ray", nodes=args.nodes,
               worker_niceness=args.worker_niceness, actors=args.actors, threads=args.threads,
               batch_size=args.batch_size, prompts=len(ps), span=round(span, 3),
               span_tokens_per_s=round(tokens / span, 2), tier=isa.TIER.name)
    label = (f"ray data, {args.nodes} node(s), {args.actors} actors x {args.threads} threads, batch {args.batch_size}, "
             f"worker niceness {args.worker_niceness}")
    if versus:
        loaded.close()
        print(summary(f"one process, model loaded, threads {args.cpus}, batch {whole}",
                      loaded_runs), file=sys.stderr)
        print(summary(f"one program per run, threads {args.cpus}, batch {whole}", programs),
              file=sys.stderr)
    print(summary(label, runs), file=sys.stderr)
    print(summary(label + " (span, without actor start-up)", runs, "span_tokens_per_s"), file=sys.stderr)
    if versus:
        whole, span = (statistics.mean(r[k] for r in runs) for k in ("tokens_per_s", "span_tokens_per_s"))
        for name, base in (("program", programs), ("loaded process", loaded_runs)):
            base = statistics.mean(r["tokens_per_s"] for r in base)
            print(f"ray whole pass / {name}: {whole / base:.2f}; decoding / {name}: {span / base:.2f}",
                  file=sys.stderr)
    ray.shutdown()
    if nodes is not None:
        nodes.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["single", "program", "ray", "versus"])
    ap.add_argument("-m", "--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="measured runs, after one warm-up run")
    ap.add_argument("--batch-sizes", default="8,16,32", help="single, program: comma-separated batch sizes")
    ap.add_argument("--threads", type=int, default=None,
                    help="single, program: kernel threads (default: all cores); ray: CPUs and threads per actor (default 1)")
    ap.add_argument("--actors", type=int, default=2, help="ray: actors")
    ap.add_argument("--batch-size", type=int, default=16, help="ray: prompts per batch")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="ray: the local cluster's CPUs")
    ap.add_argument("--nodes", type=int, default=1,
                    help="ray: split the cluster's CPUs among this many nodes (raylets) on this host")
    ap.add_argument("--worker-niceness", type=int, default=15, help="ray: the workers' nice value (Ray's default: 15)")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = ap.parse_args()
    if args.mode == "single":
        run_single(args)
    elif args.mode == "program":
        run_program(args)
    else:
        args.threads = args.threads or 1
        run_ray(args)


if __name__ == "__main__":
    main()
