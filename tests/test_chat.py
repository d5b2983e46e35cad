"""The real `moestream chat` in a pseudo-terminal: commands, sessions, and bad input that loses nothing."""

import json
import sys

import pexpect
import pytest

STATUS = r"\[ Prompt: [\d.]+ t/s \| Generation: [\d.]+ t/s \| experts: [^|]+\| KV: \d+ tok \(\d+ on host\) \]"


def spawn(*args, timeout=60):
    child = pexpect.spawn(sys.executable, ["-m", "moestream", "chat", "-n", "24", *args], encoding="utf-8",
                          timeout=timeout, dimensions=(50, 220))
    child.expect_exact("> ")
    return child


def say(child, text, expect=STATUS):
    child.sendline(text)
    child.expect(expect)
    child.expect_exact("> ")


def bye(child):
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def saved(path):
    return json.loads(path.read_text())


def test_save_then_load_in_a_new_process_restores_the_conversation(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    child = spawn("--temp", "0")
    say(child, "Good morrow, sir.")
    say(child, "What of the king?")
    say(child, f"/save {a}", "saved 4 messages")
    bye(child)
    first = saved(a)
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant"]
    assert first["settings"]["temperature"] == 0

    child = spawn()
    say(child, f"/load {a}", "loaded 4 messages")
    say(child, f"/save {b}", "saved 4 messages")
    bye(child)
    assert saved(b)["messages"] == first["messages"] and saved(b)["settings"] == first["settings"]


def test_set_temperature_0_is_reproducible_and_regen_replaces_the_reply(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    child = spawn("--temp", "1.5")
    say(child, "/set temperature 0", "temperature = 0.0")
    say(child, "Speak, speak.")
    say(child, f"/save {a}", "saved")
    say(child, "/clear", "conversation cleared")
    say(child, "Speak, speak.")
    say(child, f"/save {b}", "saved")
    say(child, "/regen")
    say(child, f"/save {c}", "saved 2 messages")
    bye(child)
    assert saved(a)["messages"] == saved(b)["messages"] == saved(c)["messages"]  # greedy: the same every time


@pytest.mark.parametrize("command,message", [
    ("/read /nonexistent/file.txt", "error: cannot read /nonexistent/file.txt"),
    ("/load /nonexistent/chat.json", "error: cannot read /nonexistent/chat.json"),
    ("/set temperature hot", "error: temperature needs a float"),
    ("/set top_p 7", "error: top_p 7.0 is out of range"),
    ("/set colour blue", "error: usage: /set"),
    ("/frobnicate", "unknown command /frobnicate"),
    ("", "empty message"),
])
def test_bad_commands_are_one_line_and_keep_the_history(tmp_path, command, message):
    out = tmp_path / "after.json"
    child = spawn("--temp", "0")
    say(child, "Good morrow.")
    child.sendline(command)
    child.expect_exact(message)
    child.expect_exact("> ")
    say(child, f"/save {out}", "saved 2 messages")
    bye(child)


def test_corrupt_session_and_non_utf8_input_keep_the_chat_running(tmp_path):
    bad, out = tmp_path / "bad.json", tmp_path / "out.json"
    bad.write_text("{ this is not json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "something-else", "messages": []}))
    child = spawn("--temp", "0")
    say(child, "Good morrow.")
    say(child, f"/load {bad}", "is not a saved chat \\(not valid JSON\\); the conversation is unchanged")
    say(child, f"/load {wrong}", "is not a saved moestream chat; the conversation is unchanged")
    child.send(b"\xff\xfe caf\xe9\r".decode("latin-1"))  # bytes that are not UTF-8
    child.expect(r"not valid UTF-8|empty message|Generation:")
    child.expect_exact("> ")
    say(child, f"/save {out}", "saved")
    bye(child)
    assert saved(out)["messages"][0] == {"role": "user", "content": "Good morrow."}


def test_context_full_reply_fails_with_advice_and_keeps_history(tmp_path):
    out = tmp_path / "out.json"
    child = spawn("--temp", "0", "-c", "64", "-n", "8")
    say(child, "Good morrow.")
    child.sendline("word " * 80)
    child.expect_exact("error: the prompt is")
    child.expect_exact("(/clear) or raise -c")
    child.expect_exact("> ")
    say(child, f"/save {out}", "saved 2 messages")
    bye(child)


def test_show_stats_verbose_and_system_prompt(tmp_path):
    sysf = tmp_path / "system.txt"
    sysf.write_text("Thou art a herald.")
    child = spawn("--verbose", "-sysf", str(sysf), "--expert-cache", "3MiB")
    say(child, "/show", "system: 'Thou art a herald.'")
    child.sendline("What news?")
    child.expect(r"experts: hit \d+% · prefetch \d+% · [\d.]+ GB moved")
    child.expect("eval rate: +[\\d.]+ tokens/s")
    child.expect_exact("> ")
    say(child, "/stats", "expert_hits")
    bye(child)


def test_memory_breakdown_at_exit():
    child = spawn()
    child.sendline("/bye")
    child.expect("memory breakdown")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
