"""Where the time goes, kernel by kernel, for one decode step and one 512-token prefill.

Each stage of the Llama forward (fastinfer/models/llama.py) runs on its own, over all layers, in a
compiled loop with the model's real weights and buffers, so no Python dispatch is counted:

    decode   one token at position 64 (the middle of tg128), attention over 65 cached keys
    prefill  two 256-token chunks (fastinfer's prefill chunk), each timed at positions 128..383
             (pp512's mean attention load)

The stages' sum is printed beside the real `forward`, which checks that nothing is missing.
Median of -r repetitions after a warm-up; the table goes to stdout and, with --out, to a file.

    python bench/profile_stages.py --dtype auto --activations int8 --label before -r 20 --out bench/results
"""
import argparse
import datetime
import time
from pathlib import Path

import numba
import numpy as np
from numba import njit

import fastinfer
from fastinfer.kernels import attention as A
from fastinfer.kernels import linear as L
from fastinfer.kernels import ops
from fastinfer.models import llama


@njit(cache=False)
def _linear_layers(out, x, w, lin, res_rows):
    for l in range(w[1].shape[0] if w[1].shape[0] else w[4].shape[0]):
        L.linear_act(out, x, w, l, lin, res_rows, True)  # quantizes x first when lin carries 8-bit buffers


@njit(cache=False)
def _attention_layers(att3, q3, k_cache, v_cache, starts, slots, windows, pattern, scratch):
    for l in range(k_cache.shape[0]):
        A.attention(att3, q3, k_cache, v_cache, l, starts, slots, windows[l], pattern, scratch)


@njit(cache=False)
def _elementwise_layers(x, xb, qkv, q, k, v, q3, k3, v3, h13, hb, attention_norm, ffn_norm, bqkv, cos, sin,
                        positions, k_cache, v_cache, slots, eps):
    # Everything in a layer that is not a matmul or attention: norms, residual adds, bias/split,
    # RoPE, the KV store and SwiGLU.
    for l in range(attention_norm.shape[0]):
        ops.rmsnorm(xb, x, attention_norm[l], eps)
        ops.split_qkv(q, k, v, qkv, bqkv[l])
        ops.rope(q3, cos, sin, positions)
        ops.rope(k3, cos, sin, positions)
        ops.store_kv(k_cache, v_cache, k3, v3, l, slots)
        ops.add_(x, xb)
        ops.rmsnorm(xb, x, ffn_norm[l], eps)
        ops.swiglu(hb, h13)
        ops.add_(x, xb)


def _median_seconds(fn, reps: int) -> float:
    fn()  # warm-up (compiles)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def profile(model, T: int, pos: int, reps: int) -> dict[str, float]:
    """Seconds per stage for T tokens at positions pos..pos+T-1 (cache filled before them)."""
    a, w = model.args, model.weights
    s = model.session(n_ctx=pos + T)
    s.prefill(np.zeros(pos + T, np.int64) + 1)  # fills the cache; its content doesn't matter here
    st = s.state
    positions = np.arange(pos, pos + T, dtype=np.int64)
    starts = np.zeros(T, np.int64)
    slots = positions.copy()
    hd = a.head_dim
    x, xb, qkv = st.x[:T], st.xb[:T], st.qkv[:T]
    q, k, v, att, h13, hb = st.q[:T], st.k[:T], st.v[:T], st.att[:T], st.h13[:T], st.hb[:T]
    q3, k3, v3 = q.reshape(T, a.n_heads, hd), k.reshape(T, a.n_kv_heads, hd), v.reshape(T, a.n_kv_heads, hd)
    att3 = att.reshape(T, a.n_heads, hd)
    lin = (st.lin_scratch, *st.act)
    x[:] = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    xb[:] = x
    numba.set_num_threads(model.threads)
    stages = {
        "wqkv": lambda: _linear_layers(qkv, xb, w.wqkv.args(), lin, 2 * a.n_kv_heads * hd if llama.KV_RESIDUAL else 0),
        "attention": lambda: _attention_layers(att3, q3, st.k_cache, st.v_cache, starts, slots, w.windows,
                                               s._pattern, st.att_scratch),
        "wo": lambda: _linear_layers(xb, att, w.wo.args(), lin, 0),
        "w13 (gate, up)": lambda: _linear_layers(h13, xb, w.w13.args(), lin, 0),
        "w2 (down)": lambda: _linear_layers(xb, hb, w.w2.args(), lin, 0),
        "norms, rope, swiglu, adds": lambda: _elementwise_layers(
            x, xb, qkv, q, k, v, q3, k3, v3, h13, hb, w.attention_norm, w.ffn_norm, w.bqkv, w.cos, w.sin,
            positions, st.k_cache, st.v_cache, slots, float(a.norm_eps)),
        "lm head": lambda: L.linear_act(st.logits[:1], xb[T - 1:], w.output.args(), 0, lin, 0, True),
    }
    out = {name: _median_seconds(fn, reps) for name, fn in stages.items()}
    ids = np.ones(T, np.int64)

    def whole():
        llama.run(a, model._w, s._st, ids, positions, starts, slots, s._pattern, False)
    out["= forward (measured)"] = _median_seconds(whole, reps)
    return out


def table(decode: dict, prefill: dict, chunks: int) -> str:
    parts = [k for k in decode if not k.startswith("=")]
    dsum = sum(decode[k] for k in parts)
    psum = sum(prefill[k] for k in parts) * chunks
    lines = [f"| stage | decode ms/token | share | prefill ms/{256 * chunks} tok | share |",
             "|---|---:|---:|---:|---:|"]
    for k in parts:
        lines.append(f"| {k} | {1e3 * decode[k]:.3f} | {decode[k] / dsum:.0%} | {1e3 * prefill[k] * chunks:.1f} "
                     f"| {prefill[k] * chunks / psum:.0%} |")
    lines.append(f"| sum of stages | {1e3 * dsum:.3f} | | {1e3 * psum:.1f} | |")
    f = "= forward (measured)"
    lines.append(f"| forward, measured | {1e3 * decode[f]:.3f} ({1 / decode[f]:.0f} t/s) | | "
                 f"{1e3 * prefill[f] * chunks:.1f} ({256 * chunks / (prefill[f] * chunks):.0f} t/s) | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: the default model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--activations", default="auto", choices=["auto", "f32", "int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-r", "--repetitions", type=int, default=20)
    p.add_argument("--label", default="", help="a note for the file name, e.g. before / after")
    p.add_argument("--out", default=None, help="directory for profile-<date>-<dtype>-<label>.md")
    a = p.parse_args()
    model = fastinfer.load(a.model, dtype=a.dtype, threads=a.threads, n_ctx=512, activations=a.activations)
    decode = profile(model, 1, 64, a.repetitions)
    prefill = profile(model, 256, 128, max(3, a.repetitions // 4))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    head = (f"# Profile: {model.source.name if hasattr(model.source, 'name') else model.source}, dtype {a.dtype}, "
            f"{model.activations} activations, "
            f"{a.threads} threads {('· ' + a.label) if a.label else ''}\n\n{datetime.date.today()} · {cpu} · "
            f"median of {a.repetitions} (decode) runs, warm-up excluded\n\n")
    text = head + table(decode, prefill, 2)
    print(text)
    if a.out:
        name = f"profile-{datetime.date.today()}-{a.dtype}-{model.activations}{('-' + a.label) if a.label else ''}.md"
        path = Path(a.out) / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
