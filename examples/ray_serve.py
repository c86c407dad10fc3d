"""Serve a model over the OpenAI API on a Ray cluster: replicas of `fastinfer serve` behind Ray
Serve's HTTP proxy, one engine per replica, its kernels on the replica's CPUs.

    python examples/ray_serve.py --num-cpus 2 --replicas 1              # local cluster, port 8000
    python examples/ray_serve.py --address auto --min-replicas 1 --max-replicas 8   # a running cluster
    python examples/ray_serve.py --smoke                                # deploy, one chat request, exit

Needs `pip install 'fastinfer[ray]'`. docs/scaling.md says how to size replicas and threads.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Serve a fastinfer model over the OpenAI API (/v1/chat/completions, /v1/completions, "
                    "/v1/models, /health, ...) with Ray Serve: each replica is one continuous-batching engine "
                    "whose kernels use --num-cpus threads.")
    ap.add_argument("-m", "--model", default=None,
                    help="a .gguf file, HF folder, converted checkpoint or model name, readable on every node "
                         "(default: SmolLM2-135M-Instruct, fetched on first use)")
    ap.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default: 1)")
    ap.add_argument("--min-replicas", type=int, default=None, help="autoscale: at least this many replicas")
    ap.add_argument("--max-replicas", type=int, default=None, help="autoscale: at most this many replicas")
    ap.add_argument("--upscale-delay", type=float, default=None, metavar="S",
                    help="autoscale: seconds of load above the target before a replica is added (Serve: 30)")
    ap.add_argument("--downscale-delay", type=float, default=None, metavar="S",
                    help="autoscale: seconds of load below the target before a replica is removed (Serve: 600)")
    ap.add_argument("--num-cpus", type=float, default=2,
                    help="CPUs each replica reserves; its kernels run on that many threads (default: %(default)s)")
    ap.add_argument("--parallel", type=int, default=4,
                    help="requests each replica decodes together (default: %(default)s)")
    ap.add_argument("--ctx", type=int, default=None,
                    help="tokens per request, prompt and completion (default: min(4096, model's))")
    ap.add_argument("--max-tokens", type=int, default=None, help="refuse requests asking for more tokens")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address Serve's HTTP proxy listens on (default: %(default)s; 0.0.0.0 for the network)")
    ap.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    ap.add_argument("--address", default=None,
                    help="Ray cluster to join ('auto', or host:port of the head); default: RAY_ADDRESS, "
                         "else a new local cluster")
    ap.add_argument("--smoke", action="store_true",
                    help="start a local 2-CPU cluster, deploy, send one chat request with the openai client, "
                         "print the reply and exit (0 on success)")
    return ap.parse_args(argv)


def deploy(args: argparse.Namespace):
    """Start Serve's proxy on --host/--port and run the app; returns once every replica is ready."""
    from ray import serve

    from fastinfer.ray import openai_app
    app = openai_app(args.model, num_cpus=args.num_cpus, parallel=args.parallel, n_ctx=args.ctx,
                     api_key=args.api_key, max_tokens=args.max_tokens, num_replicas=args.replicas,
                     min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                     upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay)
    serve.start(http_options={"host": args.host, "port": args.port})
    return serve.run(app, name="fastinfer", route_prefix="/")


def smoke(args: argparse.Namespace) -> None:
    """One streamed chat request through the proxy with the real openai client."""
    import openai
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    client = openai.OpenAI(base_url=f"http://{host}:{args.port}/v1", api_key=args.api_key or "none",
                           max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32, temperature=0, stream=True)
    finish = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    print()
    if finish is None:
        raise RuntimeError("the reply stream ended without a finish_reason")
    print(f"ray_serve: {model} replied in {time.perf_counter() - t0:.2f} s", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import ray
        from ray import serve
    except ImportError:
        print("ray_serve: Ray Serve is not installed: pip install 'fastinfer[ray]'", file=sys.stderr)
        return 1
    from fastinfer.model import model_source
    try:
        path = model_source(args.model)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        args.model = str(path)
        if args.smoke:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(address=args.address, log_to_driver=True, logging_level=logging.WARNING)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        deploy(args)
        if args.smoke:
            smoke(args)
            return 0
        nodes = sum(1 for n in ray.nodes() if n["Alive"])
        print(f"ray_serve: serving {path.name} on http://{args.host}:{args.port}/v1 from a cluster of {nodes} "
              f"node{'s' * (nodes != 1)} (Ctrl-C stops)", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # one line for people; Ray's own text can run to a traceback
        message = str(e).strip().splitlines()
        print(f"ray_serve: {type(e).__name__}: {message[0] if message else ''}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            if not args.smoke:  # the app leaves a cluster that outlives us; a local one goes whole
                serve.delete("fastinfer")
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
