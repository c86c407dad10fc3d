"""Ray: the OpenAI-compatible server as a Ray Serve deployment, and batch generation on Ray Data.

    from ray import serve
    from fastinfer.ray import Predictor, openai_app

    serve.run(openai_app(num_cpus=2, min_replicas=1, max_replicas=4))     # /v1/... on port 8000

    ds = ray.data.read_json("prompts.jsonl", lines=True).materialize()     # a "prompt" column
    pool = ray.data.ActorPoolStrategy(size=2, max_tasks_in_flight_per_actor=1)
    ds = ds.map_batches(Predictor, fn_constructor_kwargs={"max_tokens": 64}, batch_size=8,
                        compute=pool, num_cpus=1)                          # + output, tokens

Both run one model per Ray actor, its kernels on as many threads as the actor has CPUs (Ray's
`num_cpus`), every kernel call on one thread of its own (see `serving.Engine` for why). When the
actors take every CPU, read the input before they start (`materialize()`): a read task queued
behind them would wait forever. Ray is imported here only: `import fastinfer` never needs it.
Needs `pip install 'fastinfer[ray]'`.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

INSTALL = "pip install 'fastinfer[ray]'"


def _serve():
    try:
        from ray import serve
    except ImportError:
        raise ImportError(f"fastinfer.ray needs Ray Serve: {INSTALL}") from None
    return serve


def assigned_threads(threads: int | None = None) -> int:
    """Kernel threads for this Ray actor: `threads` if given, else the CPUs Ray assigned it
    (`num_cpus`, at least 1), else (outside Ray) every core Numba sees."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1; got {threads!r:.40}")
        return threads
    try:
        import ray
        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, math.floor(cpus))
    except ImportError:
        pass
    import numba
    return numba.config.NUMBA_NUM_THREADS


# ----------------------------------------------------------------------------------------------
# Ray Serve: one engine per replica
# ----------------------------------------------------------------------------------------------

class OpenAIServer:
    """One Serve replica: the model, its `Engine` on a thread of its own, and the app of
    `fastinfer serve` (`server.create_app`) on Serve's HTTP proxy.

    The engine thread loads the model, then runs the engine loop, so one thread calls every
    kernel: libgomp keeps a team per calling thread, and two teams on the replica's cores stop
    spinning between parallel regions (docs/design.md, "Serving").
    """

    def __init__(self, model: str | None = None, threads: int | None = None, parallel: int = 4,
                 n_ctx: int | None = None, api_key: str | None = None, max_tokens: int | None = None,
                 load_options: dict | None = None):
        from .model import model_source
        path = model_source(model)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        self.model_name = path.stem if path.is_file() else path.name
        self.api_key, self.max_tokens = api_key, max_tokens
        self.threads = assigned_threads(threads)
        self.engine = None
        loaded = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            from . import load
            from .serving import Engine
            try:
                m = load(path, threads=self.threads, n_ctx=n_ctx, **(load_options or {}))
                self.engine = Engine(m, parallel, n_ctx, background=False)
            except BaseException as e:  # handed to __init__, which raises it: the replica fails to start
                failed.append(e)
                return
            finally:
                loaded.set()
            self.engine.run()

        self._thread = threading.Thread(target=run, name="fastinfer-engine", daemon=True)
        self._thread.start()
        loaded.wait()
        if failed:
            raise failed[0]

    def __serve_build_asgi_app__(self):
        """Serve calls this once the replica is constructed: the app it routes HTTP to."""
        from .server import create_app
        return create_app(self.engine, self.model_name, self.api_key, self.max_tokens)

    def info(self) -> dict[str, Any]:
        """What this replica runs on, for `DeploymentHandle.info.remote()`."""
        return {"model": self.model_name, "threads": self.engine.model.threads, "parallel": self.engine.parallel,
                "n_ctx": self.engine.n_ctx, "pid": os.getpid(), "cpu_affinity": sorted(os.sched_getaffinity(0)),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}

    def __del__(self):
        if getattr(self, "engine", None) is not None:
            self.engine.close()


def openai_app(model: str | None = None, *, num_cpus: float = 1, parallel: int = 4, n_ctx: int | None = None,
               api_key: str | None = None, max_tokens: int | None = None, num_replicas: int | None = None,
               min_replicas: int | None = None, max_replicas: int | None = None, name: str = "fastinfer",
               upscale_delay_s: float | None = None, downscale_delay_s: float | None = None,
               **load_options: Any):
    """A Ray Serve application of the OpenAI-compatible server: routes and streaming as
    `fastinfer serve`, one engine of `parallel` slots per replica.

    Each replica reserves `num_cpus` CPUs and runs its kernels on that many threads (at least 1).
    `num_replicas` fixes the count; `min_replicas`/`max_replicas` autoscale between them on
    ongoing requests, aiming at `parallel` per replica (a full engine); `upscale_delay_s` and
    `downscale_delay_s` set how long the load must stay above or below that before a replica is
    added or removed (Serve's defaults: 30 s and 600 s). load_options go to `fastinfer.load`
    (dtype, activations, kv_type). Run it with `serve.run(app)`.
    """
    serve = _serve()
    for key, v in (("parallel", parallel), ("num_replicas", num_replicas), ("min_replicas", min_replicas),
                   ("max_replicas", max_replicas)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "min_replicas" else 1)):
            raise ValueError(f"{key} must be an integer >= {0 if key == 'min_replicas' else 1}; got {v!r:.40}")
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus > 0:
        raise ValueError(f"num_cpus must be a number > 0; got {num_cpus!r:.40}")
    delays = {k: v for k, v in (("upscale_delay_s", upscale_delay_s), ("downscale_delay_s", downscale_delay_s))
              if v is not None}
    for key, v in delays.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{key} must be a number >= 0; got {v!r:.40}")
    autoscale = min_replicas is not None or max_replicas is not None
    if autoscale and num_replicas is not None:
        raise ValueError("give num_replicas (a fixed count) or min_replicas/max_replicas (autoscaling), not both")
    if delays and not autoscale:
        raise ValueError(f"{' and '.join(delays)} appl{'y' if len(delays) > 1 else 'ies'} to autoscaling: "
                         "give min_replicas/max_replicas too")
    if autoscale:
        lo = 1 if min_replicas is None else min_replicas
        hi = max(lo, 1) if max_replicas is None else max_replicas
        if hi < max(lo, 1):
            raise ValueError(f"max_replicas ({hi}) must be at least min_replicas ({lo}) and 1")
        scaling = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi,
                                          "target_ongoing_requests": parallel, **delays}}
    else:
        scaling = {"num_replicas": 1 if num_replicas is None else num_replicas}
    deployment = serve.deployment(
        serve.ingress()(OpenAIServer), name=name,
        ray_actor_options={"num_cpus": num_cpus},
        # A replica takes `parallel` requests at once (its slots); more wait at the proxy for
        # whichever replica frees a slot first.
        max_ongoing_requests=parallel, **scaling)
    return deployment.bind(model=None if model is None else str(model), threads=max(1, math.floor(num_cpus)),
                           parallel=parallel, n_ctx=n_ctx, api_key=api_key, max_tokens=max_tokens,
                           load_options=load_options)


# `serve run fastinfer.ray:app_builder model=... num_cpus=2 max_replicas=4` passes strings.
_BUILDER_TYPES = {"model": str, "num_cpus": float, "parallel": int, "n_ctx": int, "api_key": str, "max_tokens": int,
                  "num_replicas": int, "min_replicas": int, "max_replicas": int, "name": str,
                  "upscale_delay_s": float, "downscale_delay_s": float, "dtype": str,
                  "activations": str, "kv_type": str}


def app_builder(args: dict[str, str]):
    """`openai_app` for Serve's CLI and config files: `serve run fastinfer.ray:app_builder
    model=PATH num_cpus=2 min_replicas=1 max_replicas=4`."""
    options = {}
    for key, value in args.items():
        if key not in _BUILDER_TYPES:
            raise ValueError(f"unknown option {key!r}; fastinfer.ray:app_builder takes {', '.join(_BUILDER_TYPES)}")
        try:
            options[key] = _BUILDER_TYPES[key](value)
        except ValueError:
            kind = {int: "an integer", float: "a number", str: "a string"}[_BUILDER_TYPES[key]]
            raise ValueError(f"{key} must be {kind}; got {value!r:.40}") from None
    if isinstance(options.get("num_cpus"), float) and options["num_cpus"].is_integer():
        options["num_cpus"] = int(options["num_cpus"])
    return openai_app(**options)


# ----------------------------------------------------------------------------------------------
# Ray Data: a stateful predictor for map_batches
# ----------------------------------------------------------------------------------------------

class Predictor:
    """Generate for a batch of prompts: `ds.map_batches(Predictor, fn_constructor_kwargs={...},
    concurrency=N, num_cpus=T, batch_size=B)`.

    Each actor loads the model once and decodes every batch together (`Model.generate` on a list
    of prompts: one compiled step per token for the whole batch). The batch gains the columns
    `output` (text), `prompt_tokens`, `output_tokens` and `finish_reason` ("stop": the model
    ended it; "length": max_tokens reached). With chat=True each prompt is a user message sent
    through the model's chat template. threads defaults to the actor's CPUs (`num_cpus`).

    A prompt that cannot run (not a string, empty, or as long as the context) fails the batch,
    and so the job, with a ValueError naming it (on_error="raise"); with on_error="record" the
    row gets finish_reason "error", an empty output and its reason in an `error` column (empty
    for the other rows, which generate as usual), so one bad row in a million does not cost the
    run.
    """

    def __init__(self, model: str | None = None, *, threads: int | None = None, max_tokens: int = 128,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, seed: int | None = None, chat: bool = False, column: str = "prompt",
                 n_ctx: int | None = None, on_error: str = "raise", **load_options: Any):
        from . import load
        if on_error not in ("raise", "record"):
            raise ValueError(f"on_error must be 'raise' or 'record'; got {on_error!r:.40}")
        self.column, self.chat, self.on_error = column, chat, on_error
        self.options = dict(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, seed=seed)
        self.max_tokens = max_tokens
        # One thread calls every kernel, whatever thread Ray calls this actor on.
        self._kernels = ThreadPoolExecutor(1, thread_name_prefix="fastinfer")
        self.model = self._kernels.submit(load, model, threads=assigned_threads(threads), n_ctx=n_ctx,
                                          **load_options).result()
        if chat and not self.model.chat_template:
            raise ValueError(f"{self.model.source} has no chat template; generate without chat")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise ValueError(f"the dataset has no {self.column!r} column; it has {', '.join(batch) or 'none'}")
        prompts = batch[self.column]
        ids: list[list[int] | None] = []
        errors: list[str] = []
        for p in prompts:
            try:
                ids.append(self._encode(p))
                errors.append("")
            except ValueError as e:
                if self.on_error == "raise":
                    raise
                ids.append(None)
                errors.append(str(e))
        good = [i for i in ids if i is not None]
        outs = iter(self._kernels.submit(self.model.generate, good, **self.options).result() if good else [])
        texts, reasons, counts = [], [], []
        for i in ids:
            o = None if i is None else next(outs)
            texts.append("" if o is None else self.model.decode(o))
            reasons.append("error" if o is None else "length" if len(o) >= self.max_tokens else "stop")
            counts.append(0 if o is None else len(o))
        result = {**batch,
                  "output": np.array(texts, dtype=object),
                  "prompt_tokens": np.array([0 if i is None else len(i) for i in ids], dtype=np.int64),
                  "output_tokens": np.array(counts, dtype=np.int64),
                  "finish_reason": np.array(reasons, dtype=object)}
        if self.on_error == "record":
            result["error"] = np.array(errors, dtype=object)
        return result

    def _encode(self, prompt) -> list[int]:
        """The prompt's ids; a ValueError naming it when it cannot run."""
        if not isinstance(prompt, str):
            raise ValueError(f"the {self.column!r} column must hold strings; found {type(prompt).__name__}")
        if self.chat:
            text = self.model.apply_chat_template([{"role": "user", "content": prompt}])
            ids = self.model.tokenizer.encode(text, add_special_tokens=False).ids
        else:
            ids = self.model.encode(prompt)
        if not ids or len(ids) >= self.model.n_ctx:
            raise ValueError(f"the prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} is {len(ids)} tokens; "
                             f"a prompt needs 1 to {self.model.n_ctx - 1} (the context holds {self.model.n_ctx})")
        return ids

    def __del__(self):
        if hasattr(self, "_kernels"):
            self._kernels.shutdown(wait=False)
