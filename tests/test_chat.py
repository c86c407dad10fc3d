"""`Conversation` (fastinfer/chat.py) and `fastinfer chat`: the cache kept between turns, a turn
prefilling only its own tokens (checked against a fresh prefill of the whole history), the oldest
turns dropped when the context is full, save/load, a reply cut short; the CLI driven through stdin
and through a pseudo-terminal (Ctrl-C stops a reply and keeps the chat, Ctrl-D leaves)."""
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastinfer
from fastinfer.chat import Conversation

FRANCE, GERMANY = "Name the capital of France.", "And the capital of Germany?"


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    return fastinfer.load(smollm2_gguf, n_ctx=1024)


def _ids(model, messages):
    return model.tokenizer.encode(model.apply_chat_template(messages), add_special_tokens=False).ids


def test_a_turn_prefills_only_its_own_tokens(model):
    chat = Conversation(model, temperature=0, max_new_tokens=24)
    first = "".join(chat.say(FRANCE))
    assert "Paris" in first
    held = list(chat.cached)
    assert len(held) == chat.session.pos and held[:chat.last.prompt_tokens] == _ids(model, chat.messages[:1])
    second = "".join(chat.say(GERMANY))
    assert "Berlin" in second
    t = chat.last
    want = _ids(model, chat.messages[:-1])  # the whole history, as a fresh prefill would see it
    assert t.prompt_tokens == len(want) and t.cached + t.prefilled == len(want)
    # Everything the first turn fed is reused; the turn prefills the reply's end-of-turn token
    # (never fed: it ended the reply), the template's markers around the new message (end, newline,
    # start, role, newline, twice) and the message itself.
    message = len(model.tokenizer.encode(GERMANY, add_special_tokens=False).ids)
    assert t.cached == len(held) and t.prefilled <= message + 12


def test_the_cached_turn_computes_what_a_fresh_prefill_does(smollm2_gguf):
    # With f32 activations the two paths differ only in float rounding: the logits after the
    # second turn's prompt, through the kept cache and from scratch, agree to 1e-3.
    m = fastinfer.load(smollm2_gguf, n_ctx=512, activations="f32")
    chat = Conversation(m, temperature=0, max_new_tokens=16)
    "".join(chat.say(FRANCE))
    chat.messages.append({"role": "user", "content": GERMANY})
    ids = _ids(m, chat.messages)
    keep = chat.session.pos
    assert chat.cached[:keep] == ids[:keep] and keep > len(ids) // 2
    cached = chat.session.prefill(ids[keep:])
    fresh = m.session(n_ctx=512).prefill(ids)
    np.testing.assert_allclose(cached, fresh, rtol=0, atol=1e-3 * np.abs(fresh).max())
    assert cached.argmax() == fresh.argmax()


def test_a_full_context_drops_the_oldest_turns(model):
    chat = Conversation(model, system="Answer briefly.", n_ctx=160, temperature=0, max_new_tokens=16)
    asked = [f"Name a colour, number {i}." for i in range(6)]
    for q in asked:
        "".join(chat.say(q))
        assert chat.last.prompt_tokens + 16 <= chat.n_ctx
    assert chat.messages[0] == {"role": "system", "content": "Answer briefly."}
    users = [m["content"] for m in chat.messages if m["role"] == "user"]
    assert users[-1] == asked[-1] and asked[0] not in users
    with pytest.raises(ValueError, match="too long"):
        chat.say("word " * 400)
    assert chat.messages[-1]["role"] == "assistant"  # the refused message left nothing behind


def test_rewind_under_eviction_equals_never_having_gone_on(model):
    # A cache capped at 256 rows holds 248 after a 280-token prompt (an eviction made room for its
    # last chunk). Going on by 8 tokens, rewinding them and feeding 8 others must compute exactly
    # what a session fed the prompt and then those 8 computes (the 8 never needed an eviction).
    text = model.tokenizer.encode(" ".join(f"item {i} is {i * i}." for i in range(200))).ids
    prompt, detour, then = text[:280], text[280:288], text[300:308]
    a = model.session(n_ctx=1024, kv_budget=256)
    a.prefill(prompt)
    fill, rows = a._pruning.fill.copy(), a._pruning.row_pos.copy()
    assert fill.max() < len(prompt)  # rows were evicted
    a.prefill(detour)
    assert (a._pruning.fill == fill + len(detour)).all()  # no eviction on the detour
    a.rewind(len(prompt))
    assert (a._pruning.fill == fill).all()
    assert all((a._pruning.row_pos[l, :n] == rows[l, :n]).all() for l, n in enumerate(fill))
    got = a.prefill(then)
    b = model.session(n_ctx=1024, kv_budget=256)
    b.prefill(prompt)
    assert np.array_equal(got, b.prefill(then))
    with pytest.raises(ValueError, match="cannot rewind"):
        a.rewind(a.pos + 1)


def test_a_chat_under_a_kv_budget_goes_past_it_without_dropping_turns(model):
    chat = Conversation(model, system="Answer briefly.", kv_budget=128, temperature=0, max_new_tokens=48)
    asked = [FRANCE, "Describe a sunrise in two sentences.", "Why do cats purr?", "Give advice to a new programmer.",
             "What is a rainbow?", GERMANY]
    replies = ["".join(chat.say(q)) for q in asked]
    assert chat.session.pos > 2 * 128 and chat.session._pruning.fill.max() <= 128
    assert chat.last.dropped == 0 and [m["content"] for m in chat.messages if m["role"] == "user"] == asked
    assert chat.last.cached > chat.last.prefilled  # the earlier turns' rows are reused, not recomputed
    assert "Paris" in replies[0] and "Berlin" in replies[-1]
    with pytest.raises(ValueError, match="kv_budget"):
        Conversation(model, kv_budget=128, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="kv_budget must be"):
        Conversation(model, kv_budget=16)


def test_save_and_load(model, tmp_path):
    chat = Conversation(model, system="Be kind.", temperature=0, max_new_tokens=8)
    "".join(chat.say(FRANCE))
    path = tmp_path / "talk.json"
    chat.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads(path.read_text())["messages"] == chat.messages
    other = Conversation(model)
    other.load(path)
    assert other.messages == chat.messages and other.system == "Be kind."
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "robot"}]}')
    with pytest.raises(ValueError, match="not a saved conversation"):
        other.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        other.load(tmp_path / "none.json")
    other.reset()
    assert other.messages == [{"role": "system", "content": "Be kind."}]


def test_a_reply_cut_short_stays_and_the_chat_goes_on(model):
    chat = Conversation(model, temperature=0, max_new_tokens=64)
    pieces = chat.say("Tell me a long story about a dragon.")
    got = [next(pieces), next(pieces)]
    pieces.close()  # what Ctrl-C does
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(got)}
    assert len(chat.cached) == chat.session.pos > 0
    assert "Paris" in "".join(chat.say(FRANCE))
    assert chat.last.cached > 0
    with pytest.raises(ValueError, match="unexpected keyword"):
        chat.say(FRANCE, bogus=1)
    with pytest.raises(ValueError, match="empty"):
        chat.say("  ")


def _cli(model_path, *extra):
    return [sys.executable, "-m", "fastinfer", "chat", "--model", str(model_path), "--temperature", "0", "-n", "24",
            "--ctx", "1024", *extra]


def test_cli_reads_turns_from_stdin(smollm2_gguf, tmp_path):
    saved = tmp_path / "c.json"
    r = subprocess.run(_cli(smollm2_gguf, "-v"), input=f"{FRANCE}\n/save {saved}\n{GERMANY}\n/nope\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Berlin" in r.stdout and ">>>" not in r.stdout
    stats = [line for line in r.stderr.splitlines() if line.startswith("[prompt")]
    assert len(stats) == 2 and " 0 cached" in stats[0] and " 0 cached" not in stats[1]
    assert "unknown command /nope" in r.stderr
    assert [m["role"] for m in json.loads(saved.read_text())["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize("extra, message", [(["--kv-budget", "16"], "kv_budget must be"),
                                            (["--kv-budget", "128", "--prompt-lookup", "2"], "does not combine")])
def test_cli_bad_kv_budget_is_one_line(smollm2_gguf, extra, message):
    r = subprocess.run(_cli(smollm2_gguf, *extra), input=f"{FRANCE}\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


class _Terminal:
    """The master side of a pty: `expect` reads until `text` shows up after what earlier calls
    matched (a read can bring the next prompt along with the text asked for)."""

    def __init__(self, fd):
        self.fd, self.out, self.at = fd, "", 0

    def expect(self, text, seconds=120):
        end = time.time() + seconds
        while text not in self.out[self.at:]:
            if time.time() > end:
                raise AssertionError(f"no {text!r} in {self.out[self.at:][-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.out += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    raise AssertionError(f"the chat ended before {text!r}: {self.out[-500:]!r}") from None
        self.at = self.out.index(text, self.at) + len(text)


def test_cli_in_a_terminal_ctrl_c_stops_a_reply_and_ctrl_d_leaves(smollm2_gguf):
    master, slave = pty.openpty()
    p = subprocess.Popen(_cli(smollm2_gguf, "-n", "400"), stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    term = _Terminal(master)
    try:
        term.expect(">>> ")
        os.write(master, b"Tell me a long story about a dragon.\n")
        term.expect("dragon.")  # the terminal's echo of the line
        term.expect(" ")  # the reply has begun
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)  # Ctrl-C
        term.expect("(stopped)")
        term.expect(">>> ")
        assert p.poll() is None  # the chat goes on
        os.write(master, (FRANCE + "\n").encode())
        term.expect("France.")  # the echo
        term.expect("Paris")
        term.expect(">>> ")
        os.write(master, b"\x04")  # Ctrl-D
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
