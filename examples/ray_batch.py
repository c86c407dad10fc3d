"""Generate over a dataset of prompts with Ray Data: one model per actor, each batch decoded together.

    python examples/ray_batch.py prompts.jsonl outputs.jsonl --max-tokens 64 --threads 1
    python examples/ray_batch.py prompts.parquet outputs.parquet --address auto --concurrency 16
    python examples/ray_batch.py --smoke

The input is JSON Lines (.jsonl, .json) or Parquet (.parquet) with a `prompt` column (--column);
the output (format by its extension) holds every input column plus `output`, `prompt_tokens`,
`output_tokens` and `finish_reason` (and `error` with --on-error record), in input order. It is written under a temporary name in the
output's directory and renamed at the end: an interrupted run leaves no partial file.
Needs `pip install 'fastinfer[ray]'`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}

SMOKE_PROMPTS = ["The capital of France is", "Once upon a time", "The three primary colours are",
                 "def fibonacci(n):", "The largest planet in the solar system is", "Water boils at",
                 "A haiku about autumn:", "The opposite of hot is"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Batch generation with Ray Data: read prompts (JSONL or Parquet), generate with a pool of "
                    "fastinfer actors (one model each, each batch decoded together), write the outputs "
                    "(JSONL or Parquet, by extension) atomically.")
    ap.add_argument("input", nargs="?", help="prompts: .jsonl/.json (one JSON object per line) or .parquet")
    ap.add_argument("output", nargs="?", help="results: .jsonl/.json or .parquet")
    ap.add_argument("-m", "--model", default=None,
                    help="a .gguf file, HF folder, converted checkpoint or model name, readable on every node "
                         "(default: SmolLM2-135M-Instruct, fetched on first use)")
    ap.add_argument("--column", default="prompt", help="the column holding the prompts (default: %(default)s)")
    ap.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="prompts each actor decodes together (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPUs per actor, and its kernel threads (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="actors (default: the cluster's CPUs / --threads)")
    ap.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate per prompt (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="0 is greedy (default: the model's generation defaults)")
    ap.add_argument("--seed", type=int, default=None, help="random seed: the same output for a prompt in any batch")
    ap.add_argument("--on-error", choices=("fail", "record"), default="fail",
                    help="a prompt that cannot run (not text, empty, longer than the context): 'fail' stops the "
                         "run and names it; 'record' writes its row with finish_reason \"error\" and the reason "
                         "in an 'error' column, and goes on (default: %(default)s)")
    ap.add_argument("--address", default=None,
                    help="Ray cluster to join ('auto', or host:port of the head); default: RAY_ADDRESS, "
                         "else a new local cluster")
    ap.add_argument("--smoke", action="store_true",
                    help="run a small built-in dataset on a local 2-CPU cluster and exit (0 on success)")
    args = ap.parse_args(argv)
    if not args.smoke and (args.input is None or args.output is None):
        ap.error("give INPUT and OUTPUT (or --smoke)")
    for name in ("batch_size", "threads", "concurrency", "max_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1; got {v}")
    return args


def check_paths(src: Path, dst: Path, column: str) -> None:
    """Fail fast, before a cluster starts: the files, the formats, the prompt column."""
    import pyarrow.parquet as pq
    if src.suffix.lower() not in FORMATS:
        raise ValueError(f"{src}: expected a .jsonl, .json or .parquet file")
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    if dst.suffix.lower() not in FORMATS:
        raise ValueError(f"{dst}: the output must end in .jsonl, .json or .parquet")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst.parent}: no such directory for the output")
    if FORMATS[src.suffix.lower()] == "parquet":
        try:
            names = pq.read_schema(src).names
        except Exception as e:  # pyarrow's errors for a file that is not Parquet vary by version
            raise ValueError(f"{src}: not a Parquet file ({e})") from None
    else:
        with open(src, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            raise ValueError(f"{src} has no rows")
        try:
            row = json.loads(first)
        except ValueError:
            raise ValueError(f"{src}: the first line is not JSON (expected one JSON object per line)") from None
        names = list(row) if isinstance(row, dict) else []
    if column not in names:
        raise ValueError(f"{src} has no {column!r} column (columns: {', '.join(names) or 'none'})")


def read(src: Path, batch_size: int):
    """The prompts, in blocks of batch_size rows, read into the object store before any actor
    starts: the actors hold every CPU, and a read task streaming behind them would wait forever."""
    import ray.data
    if FORMATS[src.suffix.lower()] == "parquet":
        ds = ray.data.read_parquet(str(src))
    else:
        ds = ray.data.read_json(str(src), lines=True)
    return ds.repartition(target_num_rows_per_block=batch_size).materialize()


def generate(ds, args: argparse.Namespace):
    """The dataset with the predictor's columns added, in blocks of --batch-size rows."""
    from ray.data import ActorPoolStrategy

    from fastinfer.ray import Predictor
    # One batch at a time per actor: a batch queued behind another actor's while this one idles
    # would cost a whole batch's time at the end of the run.
    pool = ActorPoolStrategy(size=args.concurrency, max_tasks_in_flight_per_actor=1)
    return ds.map_batches(
        Predictor, batch_size=args.batch_size, compute=pool, num_cpus=args.threads,
        fn_constructor_kwargs=dict(model=args.model, threads=args.threads, max_tokens=args.max_tokens,
                                   temperature=args.temperature, seed=args.seed, chat=args.chat,
                                   column=args.column, on_error="raise" if args.on_error == "fail" else "record"))


def write(ds, dst: Path) -> dict:
    """Stream the results into a temporary file beside dst, then rename it to dst. Returns counts."""
    import pyarrow.parquet as pq
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    counts = {"rows": 0, "prompt_tokens": 0, "output_tokens": 0, "errors": 0}
    writer = None
    try:
        with open(fd, "wb") as out:
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                counts["rows"] += table.num_rows
                counts["prompt_tokens"] += sum(table.column("prompt_tokens").to_pylist())
                counts["output_tokens"] += sum(table.column("output_tokens").to_pylist())
                counts["errors"] += table.column("finish_reason").to_pylist().count("error")
                if FORMATS[dst.suffix.lower()] == "jsonl":
                    out.writelines((json.dumps(row, ensure_ascii=False) + "\n").encode() for row in table.to_pylist())
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(out, table.schema)
                writer.write_table(table)
            if writer is not None:
                writer.close()
        if counts["rows"] == 0:
            raise ValueError("the input has no rows")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return counts


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray.data import DataContext
    src, dst = Path(args.input), Path(args.output)
    check_paths(src, dst, args.column)
    if args.smoke:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    elif not ray.is_initialized():
        ray.init(address=args.address, logging_level=logging.WARNING)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if args.concurrency is None:
        args.concurrency = max(1, cpus // args.threads)
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    print(f"ray_batch: {args.concurrency} actors x {args.threads} threads on a cluster of {nodes} "
          f"node{'s' * (nodes != 1)}, {cpus} CPUs", file=sys.stderr)
    DataContext.get_current().execution_options.preserve_order = True  # output line i is input line i
    t0 = time.perf_counter()
    counts = write(generate(read(src, args.batch_size), args), dst)
    counts["seconds"] = time.perf_counter() - t0
    return counts


def reason(e: BaseException) -> str:
    """One line saying why the run failed. Ray wraps an exception raised in an actor in its own
    (RayTaskError, UserCodeException) and keeps the original only as text: its last line
    "SomeError: message" that is not one of Ray's wrappers."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        for line in str(e).splitlines():
            m = re.match(r"(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)", line.strip())
            if m and not line.strip().startswith("ray."):
                return m.group(2)
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import ray
    except ImportError:
        print("ray_batch: Ray Data is not installed: pip install 'fastinfer[ray]'", file=sys.stderr)
        return 1
    scratch = None
    try:
        if args.smoke:
            scratch = tempfile.TemporaryDirectory(prefix="ray_batch-")
            args.input = os.path.join(scratch.name, "prompts.jsonl")
            args.output = args.output or os.path.join(scratch.name, "outputs.jsonl")
            with open(args.input, "w") as f:
                f.writelines(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(SMOKE_PROMPTS))
            args.batch_size, args.max_tokens = min(args.batch_size, 4), min(args.max_tokens, 16)
        counts = run(args)
        if args.smoke:
            with open(args.output) as f:
                rows = [json.loads(line) for line in f]
            if [r["prompt"] for r in rows] != SMOKE_PROMPTS:
                raise RuntimeError("the outputs do not match the prompts one to one, in order")
            for r in rows[:3]:
                print(f"{r['prompt']!r} -> {r['output']!r}")
        rate = counts["output_tokens"] / counts["seconds"]
        print(f"ray_batch: {counts['rows']} prompts, {counts['output_tokens']} tokens generated in "
              f"{counts['seconds']:.1f} s ({rate:.1f} tokens/s) -> {args.output}"
              + (f"; {counts['errors']} could not run (finish_reason \"error\")" if counts["errors"] else ""),
              file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line for people; Ray's own text runs to tracebacks
        print(f"ray_batch: {reason(e)}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if scratch is not None:
            scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
