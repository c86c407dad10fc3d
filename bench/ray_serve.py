"""The OpenAI server on Ray Serve under concurrent streaming clients, against `fastinfer serve`.

    python bench/ray_serve.py ray --replicas 1 --num-cpus 2 --parallel 8 --clients 8
    python bench/ray_serve.py ray --replicas 2 --num-cpus 1 --parallel 4 --clients 8
    python bench/ray_serve.py plain --threads 2 --parallel 8 --clients 8

`ray` starts a local cluster of --cpus CPUs and deploys `fastinfer.ray.openai_app` with
--replicas replicas of --num-cpus CPUs (kernel threads) and --parallel slots each; `plain` starts
`fastinfer serve` as bench/serve_load.py does. Both then take --warmup seconds of load, then
--repeat runs of --duration seconds, each with --clients clients streaming greedy chat requests of
--max-tokens (bench/serve_load.py's clients and prompts). Reported: generated tokens/s of all
clients together, mean ± std over the runs, with each run's latencies as one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys

import httpx

import serve_load  # bench/serve_load.py: the clients, the prompts, `fastinfer serve` started and waited for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_ray(args, port: int) -> str:
    import ray
    from ray import serve

    from fastinfer.ray import openai_app
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(openai_app(args.model, num_cpus=args.num_cpus, parallel=args.parallel, n_ctx=args.ctx,
                         num_replicas=args.replicas), name="fastinfer", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    httpx.get(url + "/health", timeout=60).raise_for_status()
    return url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["ray", "plain"])
    ap.add_argument("-m", "--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--replicas", type=int, default=1, help="ray: replicas")
    ap.add_argument("--num-cpus", type=int, default=2, help="ray: CPUs (kernel threads) per replica")
    ap.add_argument("--threads", type=int, default=2, help="plain: kernel threads")
    ap.add_argument("--parallel", type=int, default=8, help="slots per replica / server")
    ap.add_argument("--ctx", type=int, default=2048, help="tokens per request")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per measured run")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before measuring")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="ray: the local cluster's CPUs")
    ap.add_argument("--worker-niceness", type=int, default=15, help="ray: the workers' nice value (Ray's default: 15)")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = ap.parse_args()
    args.disconnect = 0.0
    args.client = "httpx"  # serve_load's httpx client: it reads any server's chunked SSE
    from fastinfer.kernels import isa
    from fastinfer.model import model_source
    args.model = str(model_source(args.model))
    port = _free_port()
    server = None
    if args.mode == "plain":
        server = serve_load.start("fastinfer", args, port)
        args.server_pid = server.pid
        url = f"http://127.0.0.1:{port}"
        label = f"fastinfer serve, threads {args.threads}, parallel {args.parallel}"
    else:
        url = deploy_ray(args, port)
        args.server_pid = os.getpid()  # serve_load counts this process's CPU as the server's: not reported here
        label = (f"ray serve, {args.replicas} replicas x {args.num_cpus} CPUs, parallel {args.parallel}, "
                 f"worker niceness {args.worker_niceness}")
    try:
        asyncio.run(serve_load.load(url, args.clients, argparse.Namespace(**{**vars(args), "duration": args.warmup})))
        rates = []
        for rep in range(args.repeat):
            r = asyncio.run(serve_load.load(url, args.clients, args))
            row = {"bench": "ray_serve", "mode": args.mode, "replicas": args.replicas if args.mode == "ray" else 1,
                   "threads": args.num_cpus if args.mode == "ray" else args.threads, "parallel": args.parallel,
                   "clients": args.clients, "rep": rep, "seconds": round(r["seconds"], 1), "tokens": r["tokens"],
                   "tokens_per_s": round(r["tokens"] / r["seconds"], 1), "errors": r["errors"],
                   "ttft_ms_p50": serve_load.pct(r["ttft"], 0.5), "itl_ms_p50": serve_load.pct(r["itl"], 0.5),
                   "itl_ms_p99": serve_load.pct(r["itl"], 0.99), "max_tokens": args.max_tokens, "tier": isa.TIER.name}
            if args.mode == "ray":
                row["worker_niceness"] = args.worker_niceness
            rates.append(row["tokens_per_s"])
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
        print(f"{label}, {args.clients} clients: {statistics.mean(rates):.1f} ± {sd:.1f} tokens/s "
              f"over {len(rates)} runs of {args.duration:.0f} s", file=sys.stderr)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        else:
            import ray
            ray.shutdown()


if __name__ == "__main__":
    main()
