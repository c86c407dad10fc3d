"""Prompt-lookup decoding measured against plain decoding: `fastinfer bench --prompt-lookup N`.

Each prompt is a chat turn; plain and prompt-lookup runs alternate (fresh sessions, greedy), and
decode speed is (tokens - 1) / (time after the first token), the prefill being the same either
way. A run reports both speeds, the draft tokens taken out of those drafted, and whether the two
outputs are the same token for token, and how much of the output copies the prompt (the share of
its tokens inside a 4-gram that occurs in the prompt): where the model does not copy, there is
nothing for prompt lookup to take.
"""
from __future__ import annotations

import statistics
import time

from .generate import PromptLookup, generate_ids

# The opening of Pride and Prejudice (Jane Austen, 1813; public domain): text to copy from.
PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife. However little known the feelings or views of such a man may be on his first "
    "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
    "he is considered the rightful property of some one or other of their daughters. \"My dear Mr. Bennet,\" "
    "said his lady to him one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet "
    "replied that he had not. \"But it is,\" returned she; \"for Mrs. Long has just been here, and she told "
    "me all about it.\" Mr. Bennet made no answer. \"Do you not want to know who has taken it?\" cried his "
    "wife impatiently. \"You want to tell me, and I have no objection to hearing it.\" This was invitation "
    "enough. \"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large "
    "fortune from the north of England; that he came down on Monday in a chaise and four to see the place, "
    "and was so much delighted with it, that he agreed with Mr. Morris immediately; that he is to take "
    "possession before Michaelmas, and some of his servants are to be in the house by the end of next week.\""
)

# A Python method to comment (an n-gram draft search; fixed here, so the prompt set never changes).
CODE = """\
    def draft(self, context: list[int], room: int) -> list[int]:
        if self.paused > 0:
            self.paused -= 1
            return []
        k = min(self.k, room)
        if k < 1:
            return []
        n_ctx = len(context)
        for n in range(min(self.NGRAM, n_ctx - 1), 1, -1):
            tail = context[n_ctx - n:]
            for start in range(n_ctx - n - 1, -1, -1):  # latest earlier occurrence first
                if context[start:start + n] == tail:
                    return context[start + n:start + n + k]
        return []
"""

OPEN = ["Write a short story about a robot learning to paint.", "Explain why the sky is blue.",
        "Give advice to a new programmer."]


def builtin_prompts() -> dict[str, list[tuple[str, str]]]:
    """The built-in prompt set: input-grounded tasks over PASSAGE and CODE, and open-ended
    questions."""
    code = CODE
    return {
        "grounded": [
            ("copy", f"Repeat this passage exactly, word for word:\n\n{PASSAGE}"),
            ("quote", f"Quote what Mrs. Bennet says in this passage, word for word:\n\n{PASSAGE}"),
            ("edit", f"Rewrite this Python method with a comment on each line, the code unchanged:\n\n{code}"),
        ],
        "open": [(f"q{i + 1}", q) for i, q in enumerate(OPEN)],
    }


def copied_share(prompt: list[int], out: list[int], n: int = 4) -> float:
    """The share of out's tokens that lie inside an n-gram of out which also occurs in prompt."""
    grams = {tuple(prompt[i:i + n]) for i in range(len(prompt) - n + 1)}
    inside = [False] * len(out)
    for i in range(len(out) - n + 1):
        if tuple(out[i:i + n]) in grams:
            inside[i:i + n] = [True] * n
    return sum(inside) / len(out) if out else 0.0


def _run(model, ids: list[int], n: int, lookup: int) -> tuple[list[int], float, PromptLookup | None]:
    """(tokens, seconds after the first token, the lookup's counts) for one greedy run."""
    s = model.session(n_ctx=min(model.n_ctx, len(ids) + n + 8))
    lk = PromptLookup(lookup, model.exact_draft) if lookup else None
    params = model._resolve(len(ids), max_new_tokens=n, temperature=0).sampling
    out, t1 = [], None
    for tok in generate_ids(s, ids, n, params, model.eos_ids, lookup=lk):
        out.append(tok)
        if t1 is None:
            t1 = time.perf_counter()
    return out, time.perf_counter() - t1, lk


def measure(model, prompts: dict[str, list[tuple[str, str]]], n: int, lookup: int, reps: int) -> list[dict]:
    """One record per prompt: set, name, prompt tokens, plain and lookup decode tokens/s (mean and
    std over reps), their ratio, draft tokens taken and drafted (last run), identical outputs and
    the share of the output copied from the prompt."""
    _run(model, model.encode("Hello there"), 8, lookup)  # warm-up: compiles the verification call
    rows = []
    for group, items in prompts.items():
        for name, content in items:
            ids = model.tokenizer.encode(model.apply_chat_template([{"role": "user", "content": content}]),
                                         add_special_tokens=False).ids
            plain, fast, same, lk, a = [], [], True, None, []
            for _ in range(reps):
                a, ta, _ = _run(model, ids, n, 0)
                b, tb, lk = _run(model, ids, n, lookup)
                plain.append((len(a) - 1) / ta if len(a) > 1 and ta > 0 else 0.0)
                fast.append((len(b) - 1) / tb if len(b) > 1 and tb > 0 else 0.0)
                same = same and a == b
            sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
            mp, mf = statistics.mean(plain), statistics.mean(fast)
            rows.append({"set": group, "prompt": name, "prompt_tokens": len(ids),
                         "plain": {"mean": mp, "std": sd(plain)}, "lookup": {"mean": mf, "std": sd(fast)},
                         "ratio": mf / mp if mp else 0.0, "taken": lk.accepted, "drafted": lk.drafted,
                         "identical": same, "copied": copied_share(ids, a)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| set | prompt | prompt tokens | copied from it | plain tok/s | lookup tok/s | ratio "
             "| draft tokens taken | identical |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['prompt']} | {r['prompt_tokens']} | {r['copied']:.0%} | "
                     f"{r['plain']['mean']:.1f} ± {r['plain']['std']:.1f} | "
                     f"{r['lookup']['mean']:.1f} ± {r['lookup']['std']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['taken']}/{r['drafted']} | {'yes' if r['identical'] else 'NO'} |")
    for group in dict.fromkeys(r["set"] for r in rows):
        rs = [r["ratio"] for r in rows if r["set"] == group]
        taken = sum(r["taken"] for r in rows if r["set"] == group)
        drafted = sum(r["drafted"] for r in rows if r["set"] == group)
        rate = f"{taken / drafted:.0%}" if drafted else "-"
        lines.append(f"\n{group}: mean ratio {statistics.mean(rs):.2f}x (min {min(rs):.2f}, max {max(rs):.2f}); "
                     f"drafts taken {rate}")
    return "\n".join(lines)
