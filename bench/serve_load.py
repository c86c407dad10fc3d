"""Load on an OpenAI-compatible server: N concurrent streaming chat clients for a fixed time.

    python bench/serve_load.py --engines fastinfer,llama-cpp --model FILE.gguf --clients 1,8 --duration 60

Each engine is started as its own server process on the same model file and threads (fastinfer:
`fastinfer serve`; llama-cpp: `python -m llama_cpp.server` from --llama-python), waited for, loaded
with --clients concurrent clients, then stopped. A client sends one streaming chat request after
another (prompts cycle through a fixed list, greedy, --max-tokens each); with --disconnect P it
drops a stream after a few chunks with probability P. Reported per engine and concurrency:
requests/s, generated tokens/s (all clients together), time to first token and inter-token latency
p50/p99, errors, the server's RSS at start and end and its peak, and (fastinfer) busy slots after.
Also the CPU the load generator and the server used, in % of one core (the two share the cores).
One JSON line per run; --out appends them to a file.
"""
import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx

PROMPTS = [
    "Explain why the sky is blue.", "Write a short story about a robot learning to paint.",
    "List five uses of a paperclip.", "What is the difference between a virus and a bacterium?",
    "Describe a sunrise over the sea.", "Give advice to a new programmer.",
    "Summarize the plot of a heist movie you invent.", "Why do cats purr?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_mib(pid: int, key: str) -> float:
    """A memory line of /proc/PID/status in MiB: VmRSS (now) or VmHWM (peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def start(engine: str, args, port: int) -> subprocess.Popen:
    if engine == "fastinfer":
        cmd = [sys.executable, "-m", "fastinfer", "serve", "--model", args.model, "--port", str(port),
               "--threads", str(args.threads), "--parallel", str(args.parallel), "--ctx", str(args.ctx)]
    else:
        cmd = [args.llama_python, "-m", "llama_cpp.server", "--model", args.model, "--port", str(port),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx),
               "--interrupt_requests", "False"]  # queue concurrent requests instead of cutting the running one
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"{engine} server exited with {p.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200 and (
                    engine != "fastinfer" or httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200):
                return p
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    p.kill()
    raise SystemExit(f"{engine} server did not come up")


class _Connection:
    """A minimal HTTP/1.1 keep-alive client for streamed POSTs: the load generator shares the
    server's two cores, and httpx's per-chunk work (h11 parsing, decoding, its async machinery)
    took ~9% of a core at 8 streams. This reads the chunked body and splits it into lines, no more."""

    def __init__(self, url: str):
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port or 80)
        self.reader = self.writer = None

    async def post_lines(self, path: str, body: dict):
        """(status, async iterator of the response's lines)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, self._lines(b"chunked" in head.lower())

    async def _lines(self, chunked: bool):
        if not chunked:  # an error body with a Content-Length: read no more of it, start over
            self.close()
            return
        tail = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            piece = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            tail += piece[:-2]
            *lines, tail = tail.split(b"\n")
            for line in lines:
                yield line.decode()

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class _Stream:
    """One streamed request as a client sees it: time to first token, the gaps between content
    chunks, a drop after `drop_after` chunks (None: read to the end), and how it ended."""

    def __init__(self, out: dict, drop_after: int | None):
        self.out, self.drop_after = out, drop_after
        self.t0, self.last, self.chunks = time.perf_counter(), None, 0
        self.done = self.failed = False

    @property
    def dropped(self) -> bool:
        return self.drop_after is not None and self.chunks >= self.drop_after

    def line(self, line: str) -> bool:
        """Take one line of the response; False when the client stops reading (an error event,
        the drop). After `data: [DONE]` the rest is ignored."""
        if line == "data: [DONE]":
            self.done = True
        if self.done or not line.startswith("data: "):
            return True
        d = json.loads(line[6:])
        if "error" in d:
            self.failed = True
            return False
        if d["choices"] and d["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            if self.last is None:
                self.out["ttft"].append(now - self.t0)
            else:
                self.out["itl"].append(now - self.last)
            self.last = now
            self.chunks += 1
        return not self.dropped

    def end(self) -> None:
        self.out["tokens"] += self.chunks
        if self.dropped:
            self.out["dropped"] += 1
        elif self.done:
            self.out["requests"] += 1
        else:  # an error event, or the stream cut short
            self.out["errors"] += 1


def _requests(args, rng: random.Random):
    """(body, drop_after) of a client's requests, prompts cycling from a random one."""
    k = rng.randrange(len(PROMPTS))
    while True:
        body = {"model": "m", "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
        k += 1
        yield body, rng.randint(2, 20) if rng.random() < args.disconnect else None


async def client(url: str, stop_at: float, args, rng: random.Random, out: dict) -> None:
    conn = _Connection(url)
    for body, drop_after in _requests(args, rng):
        if time.perf_counter() >= stop_at:
            break
        s = _Stream(out, drop_after)
        try:
            status, lines = await conn.post_lines("/v1/chat/completions", body)
            if status != 200:
                out["errors"] += 1
                conn.close()
                continue
            async for line in lines:
                if not s.line(line):
                    break
            if not s.done:  # dropped or cut: the connection goes with the stream
                conn.close()
            s.end()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            out["errors"] += 1
            conn.close()
    conn.close()


async def client_httpx(url: str, stop_at: float, args, rng: random.Random, out: dict) -> None:
    async with httpx.AsyncClient(timeout=300) as http:
        for body, drop_after in _requests(args, rng):
            if time.perf_counter() >= stop_at:
                break
            s = _Stream(out, drop_after)
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        out["errors"] += 1
                        await r.aread()
                        continue
                    async for line in r.aiter_lines():
                        if not s.line(line):
                            break
                s.end()
            except (httpx.HTTPError, json.JSONDecodeError):
                out["errors"] += 1


async def load(url: str, clients: int, args) -> dict:
    out = {"requests": 0, "tokens": 0, "errors": 0, "dropped": 0, "ttft": [], "itl": []}
    t0 = time.perf_counter()
    stop_at = t0 + args.duration
    run = client_httpx if args.client == "httpx" else client
    cpu0, server0 = os.times(), _cpu_seconds(args.server_pid)
    await asyncio.gather(*(run(url, stop_at, args, random.Random(i), out) for i in range(clients)))
    out["seconds"] = time.perf_counter() - t0
    cpu1 = os.times()
    out["client_cpu"] = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / out["seconds"]
    out["server_cpu"] = (_cpu_seconds(args.server_pid) - server0) / out["seconds"]
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process pid, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list, q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a .gguf file both engines read")
    ap.add_argument("--engines", default="fastinfer,llama-cpp")
    ap.add_argument("--clients", default="1,8", help="comma-separated concurrencies")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per run")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before measuring")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=8, help="fastinfer's slots")
    ap.add_argument("--ctx", type=int, default=2048, help="tokens per request (fastinfer) / in all (llama-cpp)")
    ap.add_argument("--disconnect", type=float, default=0.0, help="chance a client drops its stream early")
    ap.add_argument("--llama-python", default=os.environ.get("LLAMA_PYTHON", sys.executable),
                    help="the Python that has llama-cpp-python[server]")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="raw: a minimal HTTP/1.1 reader (default; least CPU taken from the server); httpx")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = ap.parse_args()
    for engine in args.engines.split(","):
        port = _free_port()
        p = start(engine, args, port)
        args.server_pid = p.pid
        url = f"http://127.0.0.1:{port}"
        try:
            warm = argparse.Namespace(**{**vars(args), "duration": args.warmup})
            asyncio.run(load(url, max(int(c) for c in args.clients.split(",")), warm))
            for clients in (int(c) for c in args.clients.split(",")):
                rss0 = _status_mib(p.pid, "VmRSS")
                r = asyncio.run(load(url, clients, args))
                row = {"engine": engine, "clients": clients, "seconds": round(r["seconds"], 1),
                       "requests_per_s": round(r["requests"] / r["seconds"], 3),
                       "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
                       "ttft_ms_p50": pct(r["ttft"], 0.5), "ttft_ms_p99": pct(r["ttft"], 0.99),
                       "itl_ms_p50": pct(r["itl"], 0.5), "itl_ms_p99": pct(r["itl"], 0.99),
                       "errors": r["errors"], "dropped": r["dropped"], "rss_mib_start": round(rss0, 1),
                       "rss_mib_end": round(_status_mib(p.pid, "VmRSS"), 1), "rss_mib_peak": round(_status_mib(p.pid, "VmHWM"), 1),
                       "max_tokens": args.max_tokens, "threads": args.threads, "client": args.client,
                       "client_cpu_pct": round(100 * r["client_cpu"], 1),
                       "server_cpu_pct": round(100 * r["server_cpu"], 1)}
                if engine == "fastinfer":
                    time.sleep(0.5)
                    metrics = httpx.get(url + "/metrics").text
                    row["busy_slots_after"] = int(float(next(
                        line.split()[1] for line in metrics.splitlines() if line.startswith("fastinfer_busy_slots "))))
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
        finally:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
