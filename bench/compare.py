"""Side-by-side speed of fastinfer, llama.cpp, CTranslate2 and HF transformers, in one run.

    pip install -e ".[bench]"                     # llama-cpp-python, ctranslate2, matplotlib
    pip install torch transformers                # optional: the transformers engine (and the CT2 conversion)
    python bench/compare.py                       # 2 threads, pp512 / tg128, 5 repetitions
    python bench/compare.py --threads 2 -p 512 -n 128 -r 5 --dtypes auto int8 --engines fastinfer llama.cpp

An engine whose package is missing is skipped with a note in the table. CTranslate2 and HF
transformers cannot read GGUF: they run float32 copies of the same GGUF's weights written by
bench/export_hf.py (and, for CTranslate2, converted by its own converter, which needs transformers
and torch once), cached in $FASTINFER_HOME/bench.

llama-bench's method for every engine: pp = one P-token prompt of random token ids evaluated as a
single batch from an empty cache; tg = N tokens decoded one at a time after a 1-token prompt,
greedy (argmax of each step's logits is the next input). Throughput is tokens / wall seconds.
Every engine is loaded once, then the repetitions alternate engines (repetition 0 is a warm-up
and is not counted; the engine order rotates from one repetition to the next), so slow drifts
of a noisy machine hit every engine alike.

Writes compare-<date>.md (table), compare-<date>.json (raw timings) and compare-<date>.png
(bar chart) into --out (default bench/results).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import export_hf

HERE = Path(__file__).resolve().parent
INSTALL_HINT = 'pip install -e ".[bench]"'
ENGINES = ("fastinfer", "llama.cpp", "ctranslate2", "transformers")
CT2_TYPES = ("int8", "int8_float32", "float32")  # compute types CTranslate2 offers on an AVX2 CPU
REF = ("llama.cpp", "Q8_0 (from Q4_1)")  # the row every ratio is taken against


# -- helpers -------------------------------------------------------------------------------------
def cache_home() -> Path:
    """$FASTINFER_HOME (default ~/.cache/fastinfer), as fastinfer itself resolves it."""
    return Path(os.environ.get("FASTINFER_HOME") or Path.home() / ".cache" / "fastinfer").expanduser()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_simd() -> str:
    """The vector extensions /proc/cpuinfo shows (AVX-512 or not changes llama.cpp's kernels)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")]
                return " ".join(sorted(keep, key=flags.index)) or "no AVX"
    except OSError:
        pass
    return "unknown"


def fastinfer_source() -> dict:
    """Where the imported fastinfer lives and which commit it is: the git checkout it is imported
    from (editable install), or the one it was pip-installed from (dist-info direct_url.json).
    "-dirty" marks uncommitted changes to the engine's sources."""
    import fastinfer
    pkg = Path(fastinfer.__file__).resolve().parent
    info = {"path": str(pkg), "commit": None}
    candidates = [pkg]
    try:
        from importlib.metadata import distribution
        url = json.loads(distribution("fastinfer").read_text("direct_url.json") or "{}").get("url", "")
        if url.startswith("file://"):
            candidates.append(Path(url[len("file://"):]))
    except Exception:
        pass
    for d in candidates:
        try:
            git = ["git", "-C", str(d)]
            commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
            top = subprocess.run(git + ["rev-parse", "--show-toplevel"], capture_output=True, text=True,
                                 check=True).stdout.strip()
            # -C top: the paths are the checkout's (git -C d would read them relative to d).
            dirty = subprocess.run(["git", "-C", top, "status", "--porcelain", "--", "fastinfer", "kernels",
                                    "weights"], capture_output=True, text=True, check=True).stdout.strip()
            info.update(commit=commit + ("-dirty" if dirty else ""), checkout=top)
            break
        except (OSError, subprocess.CalledProcessError):
            continue
    return info


def stats(xs: list[float]) -> dict:
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0}


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- engines: each runner has .pp(prompt) and .tg(first, n), returning elapsed seconds ---------------
class FastinferRunner:
    engine = "fastinfer"

    def __init__(self, path: Path, dtype: str, threads: int, n_ctx: int):
        """dtype: a fastinfer dtype, with "+a8" for 8-bit activations (activations="int8")."""
        import fastinfer
        dtype, a8, _ = dtype.partition("+a8")
        self.weights = {"auto": "auto (as shipped)"}.get(dtype, dtype) + (", int8 activations" if a8 else "")
        self.model = fastinfer.load(path, dtype=dtype, threads=threads, n_ctx=n_ctx,
                                    activations="int8" if a8 else "f32")
        self.vocab = int(self.model.args.vocab_size)
        self.version = getattr(fastinfer, "__version__", None) or _dist_version("fastinfer")

    def pp(self, prompt: list[int]) -> float:
        s = self.model.session()
        t0 = time.perf_counter()
        s.prefill(prompt)
        return time.perf_counter() - t0

    def tg(self, first: int, n: int) -> float:
        s = self.model.session()
        s.prefill([first])
        tok = first
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(s.decode_step(tok)))
        return time.perf_counter() - t0


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's Llama object (Llama.eval = llama_decode per batch)."""
    engine = "llama.cpp"

    def __init__(self, path: Path, label: str, threads: int, n_prompt: int, n_gen: int):
        import llama_cpp
        self.weights = label
        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_ubatch=n_prompt,
                                   logits_all=False, verbose=False)
        self.vocab = int(self.llm.n_vocab())

    def _clear(self) -> None:
        """Empty the KV cache as well as the Python-side token count (reset() only does the latter)."""
        self.llm.reset()
        ctx = self.llm._ctx
        if hasattr(ctx, "memory_clear"):
            ctx.memory_clear(True)
        else:  # older llama-cpp-python
            ctx.kv_cache_clear()

    def _logits(self) -> np.ndarray:
        """The last evaluated token's logits (llama_get_logits; Llama.eval no longer copies them)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))

    def pp(self, prompt: list[int]) -> float:
        self._clear()
        t0 = time.perf_counter()
        self.llm.eval(prompt)  # one llama_decode of the whole prompt (n_batch = n_ubatch = P)
        return time.perf_counter() - t0

    def tg(self, first: int, n: int) -> float:
        self._clear()
        self.llm.eval([first])
        tok = first
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([tok])
            tok = int(np.argmax(self._logits()))
        return time.perf_counter() - t0


class TransformersRunner:
    """HF transformers, float32 eager PyTorch, on the folder bench/export_hf.py writes."""
    engine = "transformers"

    def __init__(self, hf_dir: Path, threads: int):
        import torch
        import transformers
        torch.set_num_threads(threads)
        self.torch, self.transformers = torch, transformers
        self.weights = "f32 (from Q4_1)"
        self.version = f"{transformers.__version__} (torch {torch.__version__})"
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        self.vocab = int(self.model.config.vocab_size)

    def pp(self, prompt: list[int]) -> float:
        ids = self.torch.tensor([prompt])
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            # logits_to_keep=1: the output head runs for the last position only, as in the other
            # engines' pp (otherwise it would add a (512 x 49152 x 576) matmul).
            self.model(ids, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t0

    def tg(self, first: int, n: int) -> float:
        torch = self.torch
        # The KV cache grows in place. It is the 4th positional argument, which transformers 4
        # names past_key_values and 5 renames to cache.
        cache = self.transformers.DynamicCache()
        with torch.inference_mode():
            self.model(torch.tensor([[first]]), None, None, cache, use_cache=True)
            tok = first
            t0 = time.perf_counter()
            for _ in range(n):
                out = self.model(torch.tensor([[tok]]), None, None, cache, use_cache=True)
                tok = int(out.logits[0, -1].argmax())
            return time.perf_counter() - t0


class CTranslate2Runner:
    """CTranslate2's Generator on a model converted from bench/export_hf.py's folder.

    pp: generate_batch with include_prompt_in_result=False, which forwards the prompt minus its
    last token as one batch (no output head), then runs the last token as a decoding step with
    logits: the prompt is processed and the next token's logits exist, as in the other engines.
    The default include_prompt_in_result=True would force the prompt through the decoding loop
    one token at a time. max_length=1 stops after that first token.
    tg: generate_batch from a 1-token prompt, 128 greedy steps (min_length = max_length keeps the
    end token from stopping it), i.e. 128 single-token forwards with the argmax inside CT2's loop.
    """
    engine = "ctranslate2"

    def __init__(self, path: Path, compute_type: str, threads: int):
        import ctranslate2
        self.weights = {"int8": "int8 (from Q4_1 via f32)", "int8_float32": "int8_float32 (from Q4_1 via f32)",
                        "float32": "f32 (from Q4_1)"}[compute_type]
        self.version = ctranslate2.__version__
        self.gen = ctranslate2.Generator(str(path), device="cpu", compute_type=compute_type,
                                         intra_threads=threads, inter_threads=1)
        self.tokens = json.loads((path / "vocabulary.json").read_text())  # id -> token string
        self.vocab = len(self.tokens)

    def pp(self, prompt: list[int]) -> float:
        toks = [self.tokens[i] for i in prompt]
        t0 = time.perf_counter()
        self.gen.generate_batch([toks], max_length=1, include_prompt_in_result=False, sampling_topk=1)
        return time.perf_counter() - t0

    def tg(self, first: int, n: int) -> float:
        t0 = time.perf_counter()
        r = self.gen.generate_batch([[self.tokens[first]]], max_length=n, min_length=n,
                                    include_prompt_in_result=False, sampling_topk=1)
        dt = time.perf_counter() - t0
        if len(r[0].sequences_ids[0]) != n:
            raise RuntimeError(f"CTranslate2 generated {len(r[0].sequences_ids[0])} tokens, not {n}")
        return dt


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def requantized(src: Path, fmt: str) -> Path:
    """src requantized to fmt ("Q8_0" or "Q4_0") with llama.cpp's quantizer, cached under
    $FASTINFER_HOME/bench."""
    import llama_cpp
    out = cache_home() / "bench" / (src.name.replace(".Q4_1.gguf", "") + f".{fmt}.gguf")
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{fmt}")
    params.allow_requantize = True  # the source is already 4-bit
    params.nthread = os.cpu_count() or 1
    note(f"quantizing {src.name} -> {out} ({fmt})")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize failed with code {rc}")
    tmp.rename(out)
    return out


# -- main ------------------------------------------------------------------------------------------
def _importable(modules: tuple[str, ...], skipped: str, notes: list[str]) -> bool:
    """True if every module imports; otherwise note `skipped` (why and how to install) and False."""
    try:
        for m in modules:
            __import__(m)
    except ImportError:
        note(skipped)
        notes.append(skipped)
        return False
    return True


def _file_label(path: Path) -> str:
    """The llama.cpp row of the file as downloaded: its name, or Q4_1 for the default model."""
    return "Q4_1" if path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" else f"{path.name} (as is)"


def build_runners(args, model_path: Path) -> tuple[list, list[str]]:
    runners, notes = [], []
    n_ctx = args.n_prompt + args.n_gen + 8
    if "fastinfer" in args.engines:
        for dt in args.dtypes:
            note(f"loading fastinfer dtype={dt}")
            runners.append(FastinferRunner(model_path, dt, args.threads, n_ctx))
    if "llama.cpp" in args.engines and _importable(
            ("llama_cpp",), f"llama.cpp skipped: llama-cpp-python is not installed (install it with `{INSTALL_HINT}`)",
            notes):
        variants = {"Q8_0": (REF[1], "Q8_0"), "file": (_file_label(model_path), model_path),
                    "Q4_0": ("Q4_0 (from Q4_1)", "Q4_0")}
        for label, path in (variants[v] for v in args.llama_weights):
            path = requantized(model_path, path) if isinstance(path, str) else path
            note(f"loading llama.cpp {label}")
            runners.append(LlamaCppRunner(path, label, args.threads, args.n_prompt, args.n_gen))
    if "ctranslate2" in args.engines and _importable(
            ("ctranslate2",), f"CTranslate2 skipped: ctranslate2 is not installed (install it with `{INSTALL_HINT}`)",
            notes):
        for ct in args.ct2_types:
            storage = "float32" if ct == "float32" else "int8"
            try:
                path = export_hf.ct2_model(model_path, storage)
            except ImportError as e:  # the first conversion loads the model through transformers
                msg = (f"CTranslate2 {ct} skipped: converting the model needs transformers and torch ({e}); "
                       f"convert it once with `python bench/export_hf.py --ct2 {storage}` where they are installed")
                note(msg)
                notes.append(msg)
                continue
            note(f"loading CTranslate2 {ct}")
            runners.append(CTranslate2Runner(path, ct, args.threads))
    if "transformers" in args.engines and _importable(
            ("torch", "transformers"),
            "HF transformers skipped: transformers/torch are not installed (`pip install torch transformers`)", notes):
        note("loading HF transformers")
        runners.append(TransformersRunner(export_hf.hf_model(model_path), args.threads))
    return runners, notes


def measure(runners: list, args) -> dict[int, dict[str, list[float]]]:
    """Seconds per repetition for each runner; repetitions alternate runners, order rotating."""
    rng = np.random.default_rng(0)
    vocab = min(r.vocab for r in runners)
    prompt = rng.integers(0, vocab, args.n_prompt).tolist()
    times = {i: {"pp": [], "tg": []} for i in range(len(runners))}
    for rep in range(args.repetitions + 1):  # repetition 0 is the warm-up
        k = rep % len(runners)
        for i in list(range(len(runners)))[k:] + list(range(len(runners)))[:k]:
            r = runners[i]
            t_pp = r.pp(prompt)
            t_tg = r.tg(prompt[0], args.n_gen)
            tag = "warm-up" if rep == 0 else f"rep {rep}/{args.repetitions}"
            note(f"  {tag:>9}  {r.engine:<12} {r.weights:<24} pp {args.n_prompt / t_pp:8.1f} t/s   "
                 f"tg {args.n_gen / t_tg:7.1f} t/s")
            if rep:
                times[i]["pp"].append(t_pp)
                times[i]["tg"].append(t_tg)
    return times


def rows_from(runners, times, args) -> list[dict]:
    rows = []
    for i, r in enumerate(runners):
        pp = [args.n_prompt / t for t in times[i]["pp"]]
        tg = [args.n_gen / t for t in times[i]["tg"]]
        rows.append({"engine": r.engine, "weights": r.weights, "version": r.version,
                     "pp": stats(pp), "tg": stats(tg), "pp_tps": pp, "tg_tps": tg,
                     "pp_seconds": times[i]["pp"], "tg_seconds": times[i]["tg"]})
    ref = next((x for x in rows if (x["engine"], x["weights"]) == REF), None) or next(
        (x for x in rows if x["engine"] == "llama.cpp"), None)  # else llama.cpp on the file itself
    for x in rows:
        x["ratio"] = ({k: x[k]["mean"] / ref[k]["mean"] for k in ("pp", "tg")} if ref else None)
    return rows


def versions_line(meta) -> str:
    v = meta["versions"]
    parts = [f"fastinfer {meta['fastinfer']['commit'] or '(commit unknown)'}"]
    parts += [f"{label} {v[engine]}" for engine, label in (("llama.cpp", "llama-cpp-python"),
                                                          ("ctranslate2", "ctranslate2"),
                                                          ("transformers", "transformers")) if v.get(engine)]
    return ", ".join(parts)


def fastest_others(rows) -> list[str]:
    """For pp and tg: the best fastinfer row against the fastest other engine (what the docs compare against)."""
    out = []
    for key, what in (("pp", "prefill"), ("tg", "decode")):
        ours = [x for x in rows if x["engine"] == "fastinfer"]
        theirs = [x for x in rows if x["engine"] != "fastinfer"]
        if ours and theirs:
            a = max(ours, key=lambda x: x[key]["mean"])
            b = max(theirs, key=lambda x: x[key]["mean"])
            out.append(f"{what}: fastest other engine is {b['engine']} {b['weights']} ({b[key]['mean']:.1f} t/s); "
                       f"fastinfer {a['weights']} reaches {a[key]['mean'] / b[key]['mean']:.2f}× of it")
    return out


def markdown(rows, meta, args) -> str:
    p, n = args.n_prompt, args.n_gen
    lines = [f"# fastinfer side by side with other engines, {meta['date']}", "",
             f"{meta['cpu']} ({meta['cpu_simd']}), {args.threads} threads, mean ± std over {args.repetitions} repetitions "
             f"(warm-up excluded, engines alternating). {versions_line(meta)}.", "",
             f"fastinfer's ISA tier: **{meta['isa']}**" + (f" (forced with FASTINFER_ISA; the CPU runs {meta['isa_best']})"
                                                         if meta["isa"] != meta["isa_best"] else "")
             + (f". llama.cpp: {meta['llama_cpp_system_info']}" if meta.get("llama_cpp_system_info") else "") + ".", "",
             f"| engine | weights | pp{p} (t/s) | tg{n} (t/s) | pp{p} vs llama.cpp {meta['ref']} | "
             f"tg{n} vs llama.cpp {meta['ref']} |",
             "|---|---|---|---|---|---|"]
    for x in rows:
        ratio = x["ratio"]
        rp, rt = (f"{ratio['pp']:.2f}×", f"{ratio['tg']:.2f}×") if ratio else ("–", "–")
        lines.append(f"| {x['engine']} | {x['weights']} | {x['pp']['mean']:.1f} ± {x['pp']['std']:.1f} | "
                     f"{x['tg']['mean']:.1f} ± {x['tg']['std']:.1f} | {rp} | {rt} |")
    extra = fastest_others(rows) + meta["notes"]
    if extra:
        lines += [""] + [f"- {s}" for s in extra]
    return "\n".join(lines) + "\n"


def chart(rows, meta, args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{x['engine']}\n{x['weights']}" for x in rows]
    palette = {"fastinfer": "#1f77b4", "llama.cpp": "#ff7f0e", "ctranslate2": "#9467bd", "transformers": "#2ca02c"}
    colors = [palette.get(x["engine"], "#7f7f7f") for x in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.9 * len(rows) + 2.2))
    for ax, key, title in ((axes[0], "pp", f"prompt processing pp{args.n_prompt}"),
                           (axes[1], "tg", f"generation tg{args.n_gen}")):
        means = [x[key]["mean"] for x in rows]
        stds = [x[key]["std"] for x in rows]
        y = np.arange(len(rows))[::-1]
        ax.barh(y, means, xerr=stds, color=colors, capsize=4)
        ax.set_yticks(y, labels)
        ax.set_xlabel("tokens / s (higher is better)")
        ax.set_title(title)
        ax.set_xlim(0, max(m + s for m, s in zip(means, stds)) * 1.35)
        for yi, m, sd, x in zip(y, means, stds, rows):
            r = f" ({x['ratio'][key]:.2f}×)" if x["ratio"] else ""
            ax.text(m + sd, yi, f"  {m:.0f}{r}", va="center", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"fastinfer side by side — SmolLM2-135M, {args.threads} threads, {meta['cpu']}, {meta['date']}\n"
                 f"mean ± std of {args.repetitions} repetitions; ratios vs llama.cpp {meta['ref']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", "-t", type=int, default=2, help="threads for every engine (default: 2)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for pp (default: 512)")
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens for tg (default: 128)")
    ap.add_argument("-r", "--repetitions", type=int, default=5, help="counted repetitions (default: 5)")
    ap.add_argument("--dtypes", nargs="+", default=["auto+a8", "int8", "auto"],
                    help="fastinfer dtypes, '+a8' for 8-bit activations, otherwise f32 activations "
                         "(default: auto+a8 int8 auto)")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES,
                    help="engines to run (default: all; missing ones are skipped with a note)")
    ap.add_argument("--ct2-types", nargs="+", default=["int8"], choices=CT2_TYPES,
                    help="CTranslate2 compute types (default: int8; on a CPU int8 and int8_float32 are the same)")
    ap.add_argument("--model", type=Path, default=None,
                    help="the GGUF (default: $FASTINFER_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument("--llama-weights", nargs="+", default=["Q8_0", "file", "Q4_0"], choices=["Q8_0", "file", "Q4_0"],
                    help="llama.cpp's rows: the file requantized to Q8_0 / Q4_0 by llama.cpp, or the file as it is "
                         "(default: all three; a K-quant download: file)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="output directory (default: bench/results)")
    ap.add_argument("--tag", default="", help="suffix for the output files' names (compare-<date>-<tag>.*)")
    args = ap.parse_args(argv)
    for name in ("threads", "n_prompt", "n_gen", "repetitions"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive")

    model_path = args.model or cache_home() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not model_path.exists():
        if args.model:
            ap.error(f"{model_path} does not exist")
        from fastinfer.weights.fetch import default_model
        model_path = default_model()

    runners, notes = build_runners(args, model_path)
    if not runners:
        note("nothing to measure")
        return 1
    t_start = time.time()
    times = measure(runners, args)
    rows = rows_from(runners, times, args)

    now = _dt.datetime.now()
    from fastinfer.kernels import isa
    meta = {"date": now.strftime("%Y-%m-%d"), "time": now.isoformat(timespec="seconds"), "cpu": cpu_model(), "cpu_simd": cpu_simd(),
            "isa": isa.TIER.name, "isa_best": isa.BEST.name,
            "threads": args.threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
            "repetitions": args.repetitions, "model": str(model_path), "fastinfer": fastinfer_source(),
            "versions": {r.engine: r.version for r in runners}, "python": platform.python_version(),
            "measure_seconds": round(time.time() - t_start, 1), "notes": notes,
            "ref": next((x["weights"] for x in rows if x["ratio"] and x["ratio"]["pp"] == 1.0 and x["engine"] == "llama.cpp"),
                        "–")}
    try:
        import llama_cpp
        meta["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    except Exception:
        pass
    try:
        import numba
        meta["numba"] = numba.__version__
        meta["numba_threading_layer"] = numba.threading_layer()
    except Exception:
        pass
    noisy = [f"{x['engine']} {x['weights']} {k}{args.n_prompt if k == 'pp' else args.n_gen}: "
             f"std {x[k]['std'] / x[k]['mean']:.0%} of mean"
             for x in rows for k in ("pp", "tg") if x[k]["std"] > 0.15 * x[k]["mean"]]
    for s in noisy:
        note(f"warning: noisy measurement ({s}); consider rerunning on a quiet machine")
    meta["noisy"] = noisy

    md = markdown(rows, meta, args)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"compare-{meta['date']}{'-' + args.tag if args.tag else ''}"
    Path(f"{stem}.md").write_text(md)
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    try:
        chart(rows, meta, args, Path(f"{stem}.png"))
    except ImportError:
        note(f"no chart: matplotlib is not installed (install it with `{INSTALL_HINT}`)")
    note(f"wrote {stem}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
