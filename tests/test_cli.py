"""The real `moestream` command: generate for scripts, and a chat driven through a pseudo-terminal."""

import json
import subprocess
import sys
import time

import pexpect
import pytest

MOESTREAM = [sys.executable, "-m", "moestream"]


def run(*args, stdin=None):
    return subprocess.run(MOESTREAM + list(args), input=stdin, capture_output=True, text=True, timeout=120)


def test_generate_prints_text_on_stdout_and_timings_on_stderr():
    r = run("generate", "-p", "ROMEO:", "-n", "12", "--temp", "0", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "prompt eval time" in r.stderr and "eval time" in r.stderr and "12 runs" in r.stderr


def test_generate_from_stdin_as_json_is_deterministic_at_temp_0():
    a = run("generate", "--json", "--chat", "-n", "10", "--temp", "0", stdin="What news?")
    b = run("generate", "--json", "--chat", "-n", "10", "--temp", "0", stdin="What news?")
    assert a.returncode == 0, a.stderr
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["text"] == jb["text"] and ja["generated_tokens"] >= 1
    assert ja["prompt_tokens"] > 5


@pytest.mark.parametrize("args,message", [
    (["generate", "-p", ""], "the prompt is empty"),
    (["generate", "-f", "/nonexistent/file.txt"], "cannot read prompt file"),
    (["generate", "-p", "hi", "-c", "1M"], "exceeds this model's maximum"),
    (["generate", "-p", "hi", "-c", "lots"], "is not a token count"),
    (["generate", "-p", "hi", "--device", "cuda:7"] if not __import__("torch").cuda.is_available() else
     ["generate", "-p", "hi", "--dtype", "int3"], "device cuda was asked for" if not __import__("torch").cuda.is_available() else "dtype"),
])
def test_bad_input_is_one_line(args, message):
    r = run(*args)
    assert r.returncode == 1
    assert message in r.stderr and r.stderr.strip().count("\n") == 0


def spawn_chat(*args):
    child = pexpect.spawn(sys.executable, ["-m", "moestream", "chat", *args], encoding="utf-8", timeout=60,
                          dimensions=(40, 200))
    child.expect_exact("> ")
    return child


def test_chat_two_turns_then_bye():
    child = spawn_chat("-n", "16", "--temp", "0")
    child.sendline("Good morrow, sir.")
    child.expect(r"Prompt: [\d.]+ t/s \| Generation: [\d.]+ t/s")
    child.expect_exact("> ")
    child.sendline("And what of the king?")
    child.expect(r"Generation: [\d.]+ t/s")
    child.expect_exact("> ")
    child.sendline("")
    child.expect("empty message")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_reply_then_a_second_ctrl_c_exits_130():
    child = spawn_chat("-n", "3000", "--ignore-eos", "--temp", "1")
    child.sendline("Tell me a very long tale.")
    child.expect_exact("Tell me a very long tale.")  # the echo of what was typed
    child.expect(r"[A-Za-z]{2,}")  # the reply is streaming now (however long loading took)
    time.sleep(0.5)
    child.sendintr()
    child.expect("interrupted: the partial reply is kept")
    child.expect_exact("> ")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130


def test_ctrl_c_at_the_prompt_warns_once_then_exits_130():
    child = spawn_chat()
    child.sendintr()
    child.expect("Ctrl\\+C again to exit")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130


def test_ctrl_d_exits_cleanly():
    child = spawn_chat()
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
