"""The command line on a tiny model: bench's JSON line, generate's stream, help texts."""
import json
import subprocess
import sys

import pytest

from tiny_models import TINY_CFG, gguf_tokenizer_fields, random_llama_weights, tiny_bpe_tokenizer, write_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf", TINY_CFG, random_llama_weights(TINY_CFG),
                      "Q8_0", tokenizer_vocab=gguf_tokenizer_fields(tiny_bpe_tokenizer()))


def _cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "fastinfer", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)


def test_bench_json_line(tiny):
    r = _cli("bench", "-m", str(tiny), "-p", "16", "-n", "4", "-r", "2", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) == {"model", "dtype", "activations", "threads", "batch", "cpu", "isa", "attention", "pp", "tg"}
    from fastinfer.kernels import isa
    assert res["isa"] == isa.TIER.name and res["cpu"] == isa.cpu_model()
    assert res["threads"] == 1 and res["dtype"] == "auto" and res["attention"] == "dense"
    assert res["pp"]["tokens"] == 16 and res["tg"]["tokens"] == 4
    assert res["pp"]["mean"] > 0 and res["tg"]["std"] >= 0


def test_bench_dense_and_sparse(tiny):
    r = _cli("bench", "-m", str(tiny), "-p", "40", "-n", "3", "-r", "2", "--threads", "1", "--json",
             "--attention", "both", "--block", "4", "--local-blocks", "1", "--dense-last", "8")
    assert r.returncode == 0, r.stderr
    assert "prefill speedup, sparse over dense" in r.stdout
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["attention"] == "dense" and res["pp"]["tokens"] == 40
    assert res["sparse"]["attention"] == "sparse block=4 global=1 local=1 dense_last=8"
    assert res["sparse"]["pp"]["mean"] > 0


@pytest.mark.parametrize("flags,msg", [
    (["--block", "8"], "--block: only with --attention sparse"),
    (["--attention", "sparse", "--local-blocks", "-2"], "--local-blocks: must be an integer >= 0"),
    (["--attention", "sparse", "--stride", "0"], "--stride: must be"),
    (["--attention", "sparse", "--dense-last", "-1"], "--dense-last: must be an integer >= 0"),
    (["--dense-last", "4"], "--dense-last: only with --attention sparse"),
    (["--attention", "sparse", "--block", "0"], "--block: expected a positive integer"),
])
def test_generate_attention_flags_are_checked(tiny, flags, msg):
    r = _cli("generate", "hello", "-m", str(tiny), "-n", "2", *flags)
    assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr


def test_generate_sparse_runs(tiny):
    r = _cli("generate", "hello world", "-m", str(tiny), "-n", "4", "--temperature", "0", "--attention", "sparse",
             "--block", "2", "--local-blocks", "0")
    assert r.returncode == 0 and r.stdout.startswith("hello world"), r.stderr


def test_generate_greedy_is_repeatable_and_echoes_prompt(tiny):
    a = _cli("generate", "hello world", "-m", str(tiny), "-n", "8", "--temperature", "0")
    b = _cli("generate", "hello world", "-m", str(tiny), "-n", "8", "--temperature", "0")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("hello world")


def test_generate_reads_stdin(tiny):
    r = _cli("generate", "-", "-m", str(tiny), "-n", "4", "--seed", "1", stdin="hello")
    assert r.returncode == 0 and r.stdout.startswith("hello")


@pytest.mark.parametrize("cmd", ["generate", "pull", "convert", "bench", "perplexity"])
def test_every_command_has_help(cmd):
    r = _cli(cmd, "--help")
    assert r.returncode == 0 and "usage: fastinfer " + cmd in r.stdout
