"""The real `moestream chat` in a pseudo-terminal: commands, sessions, and bad input that loses nothing."""

import errno
import io
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest
from rich.console import Console

from moestream.cli.chat import SESSION_FORMAT, ChatSession, json_depth, loop, parse_session
from moestream.errors import MoestreamError
from moestream.model.sampling import SamplingParams

STATUS = r"\[ Prompt: [\d.]+ t/s \| Generation: [\d.]+ t/s \| experts: [^|]+\| KV: \d+ tok \(\d+ on host\) \]"


def spawn(*args, timeout=60, env=None, patch=None):
    """The real chat in a pseudo-terminal; `patch`: Python run first in the child (to make the model fail
    or stall on purpose), then the same command line."""
    argv = ["-m", "moestream"] if patch is None else ["-c", patch + "\nfrom moestream.cli.main import cli\n"
                                                      "cli(sys.argv[1:], prog_name='moestream')"]
    child = pexpect.spawn(sys.executable, [*argv, "chat", "-n", "24", *args], encoding="utf-8", codec_errors="replace",
                          timeout=timeout, dimensions=(50, 220), env=None if env is None else {**os.environ, **env})
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


def one_line(child, command, words):
    """Send a command; all it prints is one line holding `words` (no traceback), then the prompt."""
    child.sendline(command)
    child.expect_exact("> ")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", child.before)  # colours, a terminal's bracketed-paste codes
    lines = [line for line in text.split("\n") if line.strip()]
    assert len(lines) == 2 and words in lines[1], (command, lines)  # the echo of the command, then one line
    return lines[1]


# Patched into the child: the Nth call of LLM.complete misbehaves as `act` says, the others run as usual.
MISBEHAVE = """
import sys, time
import moestream.llm
real, calls = moestream.llm.LLM.complete, [0]
def complete(self, messages, params, stream=None):
    calls[0] += 1
    act = ACTS.get(calls[0])
    if act == "stall":
        print("(stalling)", flush=True)
        time.sleep(120)
    elif act == "raise":
        raise RuntimeError("CUDA error: an illegal memory access was encountered\\nCUDA kernel errors might be async")
    elif act == "stream then raise":
        stream("Half a reply")
        raise TypeError("a bug halfway")
    return real(self, messages, params, stream)
moestream.llm.LLM.complete = complete
"""


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
    ("/set temperature hot", "error: temperature needs a number, not 'hot'"),
    ("/set top_p 7", "error: top-p 7.0 must be a number in (0, 1]"),
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
    say(child, f"/load {bad}", "is not a saved moestream chat \\(not valid JSON\\); the conversation is unchanged")
    say(child, f"/load {wrong}", 'is not a saved moestream chat \\(no "format": "moestream-chat/1" marker\\); '
        "the conversation is unchanged")
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
    say(child, "/stats", "experts.hits")
    bye(child)


def test_memory_breakdown_at_exit():
    child = spawn()
    child.sendline("/bye")
    child.expect("memory breakdown")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# --- nothing lost, nothing crashes (#11) ---------------------------------------------------------

def test_an_internal_error_is_one_line_with_a_crash_log_and_the_conversation_goes_on(tmp_path):
    out = tmp_path / "out.json"
    child = spawn("--temp", "0", env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
                  patch="ACTS = {2: 'raise', 3: 'stream then raise'}" + MISBEHAVE)
    say(child, "Good morrow.")  # call 1: a real reply
    logs = []
    for message, what in [("What news?", "RuntimeError: CUDA error: an illegal memory access was encountered"),
                          ("And the king?", "TypeError: a bug halfway")]:
        child.sendline(message)
        child.expect(r"error: internal error \((.*)\); the conversation is kept; details in (\S+\.log)\r\n")
        assert child.match.group(1) == what  # one line: the first line of the message only
        logs.append(Path(child.match.group(2)))
        child.expect_exact("> ")
    say(child, "Farewell.")  # call 4: the chat still works
    say(child, f"/save {out}", "saved 4 messages")
    bye(child)
    assert [m["content"] for m in saved(out)["messages"] if m["role"] == "user"] == ["Good morrow.", "Farewell."]
    assert all(m["content"] for m in saved(out)["messages"])
    assert len(set(logs)) == 2 and all(log.parent == tmp_path / "cache" / "moestream" for log in logs)
    assert "Traceback" in logs[0].read_text() and "RuntimeError: CUDA error" in logs[0].read_text()
    assert "TypeError: a bug halfway" in logs[1].read_text()


def test_ctrl_c_before_the_first_token_leaves_no_empty_turn_and_regen_still_works(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    child = spawn("--temp", "0", patch="ACTS = {2: 'stall', 5: 'stall'}" + MISBEHAVE)
    say(child, "Good morrow.")
    child.sendline("What news?")  # call 2 stalls before its first token
    child.expect_exact("(stalling)")
    child.sendintr()
    child.expect_exact("[interrupted before the first token: nothing was added to the conversation]")
    child.expect_exact("> ")
    say(child, "/regen")  # call 3: answers "Good morrow." again
    say(child, "And the king?")  # call 4
    say(child, f"/save {a}", "saved 4 messages")
    child.sendline("/regen")  # call 5 stalls: the old reply must stay
    child.expect_exact("(stalling)")
    child.sendintr()
    child.expect_exact("nothing was added to the conversation")
    child.expect_exact("> ")
    say(child, f"/save {b}", "saved 4 messages")
    bye(child)
    messages = saved(a)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages[::2]] == ["Good morrow.", "And the king?"]
    assert all(m["content"] for m in messages) and saved(b)["messages"] == messages


def test_set_and_load_check_values_as_the_flags_do(tmp_path):
    out, nan_session = tmp_path / "out.json", tmp_path / "nan.json"
    nan_session.write_text('{"format": "moestream-chat/1", "messages": [], "settings": {"temperature": NaN}}')
    child = spawn("--temp", "0", "-s", "3")
    say(child, "Good morrow.")
    one_line(child, "/set temperature nan", "error: temperature nan must be a finite number >= 0")
    one_line(child, "/set seed 18446744073709551616", "error: seed 18446744073709551616 must be a whole number from 0")
    one_line(child, f"/load {nan_session}", "has a bad setting: temperature nan must be a finite number")
    one_line(child, "/set seed 9223372036854775807", "seed = 9223372036854775807")
    say(child, f"/save {out}", "saved 2 messages")
    bye(child)
    assert saved(out)["settings"]["temperature"] == 0 and saved(out)["settings"]["seed"] == 2**63 - 1


def test_load_checks_schema_size_and_depth_then_a_good_file_still_loads(tmp_path):
    good, out = tmp_path / "good.json", tmp_path / "out.json"
    deep = tmp_path / "deep.json"
    deep.write_text('{"format": "moestream-chat/1", "messages": ' + "[" * 200_000 + "]" * 200_000 + "}")
    child = spawn("--temp", "0")
    say(child, "Good morrow.")
    say(child, f"/save {good}", "saved 2 messages")
    say(child, "/clear", "conversation cleared")
    one_line(child, f"/load {deep}", "(JSON nested deeper than 64 levels); the conversation is unchanged")
    say(child, f"/load {good}", "loaded 2 messages")
    say(child, f"/save {out}", "saved 2 messages")
    bye(child)
    assert saved(out)["messages"] == saved(good)["messages"]


def test_save_replaces_only_a_saved_chat(tmp_path):
    session, foreign, out = tmp_path / "s.json", tmp_path / "notes.txt", tmp_path / "out.json"
    foreign.write_bytes(b"my notes, not a chat\n")
    child = spawn("--temp", "0")
    say(child, "Good morrow.")
    say(child, f"/save {session}", "saved 2 messages")
    say(child, "What news?")
    say(child, f"/save {session}", "saved 4 messages")  # its own file: replaced
    one_line(child, f"/save {foreign}", "exists and is not a saved moestream chat; moestream never overwrites a file")
    say(child, f"/save {out}", "saved 4 messages")
    bye(child)
    assert foreign.read_bytes() == b"my notes, not a chat\n"
    assert saved(session)["messages"] == saved(out)["messages"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "out.json", "s.json"]  # no temporaries


def test_read_refuses_special_oversized_and_binary_files_then_reads_text(tmp_path):
    fifo, text, out = tmp_path / "fifo", tmp_path / "question.txt", tmp_path / "out.json"
    os.mkfifo(fifo)
    (tmp_path / "big.txt").write_text("word " * 300_000)
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    text.write_text("What news from the court?\n")
    child = spawn("--temp", "0")
    say(child, "Good morrow.")
    one_line(child, f"/read {fifo}", "is a FIFO (named pipe); /read reads regular files only")
    one_line(child, "/read /dev/zero", "/dev/zero is a character device; /read reads regular files only")
    one_line(child, f"/read {tmp_path}", "is a directory; /read reads regular files only")
    one_line(child, f"/read {tmp_path / 'big.txt'}", "is 1.4 MiB, over the 1 MiB that /read reads")
    one_line(child, f"/read {tmp_path / 'binary'}", "is not UTF-8 text: /read sends text files only")
    say(child, f"/read {text}")
    say(child, f"/save {out}", "saved 4 messages")
    bye(child)
    assert saved(out)["messages"][2] == {"role": "user", "content": "What news from the court?\n"}


def test_non_utf8_input_under_the_c_locale_is_one_line(tmp_path):
    out = tmp_path / "out.json"
    child = spawn("--temp", "0", env={"LC_ALL": "C", "LANG": "C"})  # stdin then hands over surrogate escapes
    say(child, "Good morrow.")
    # Latin-1 bytes; a bad UTF-8 sequence inside a multi-line message (under C, readline reads some other
    # high bytes, such as 0xff, as Meta keys and never passes them on)
    for raw in (b"caf\xe9 au lait\r", b"\xe9t\xe9\r", b'"""\rfirst line\rbad \xc3\x28 byte\r"""\r'):
        os.write(child.child_fd, raw)
        child.expect_exact("error: that input is not valid UTF-8: type it again")
        child.expect_exact("> ")
    os.write(child.child_fd, "Good café, sir.\r".encode())  # valid UTF-8 still works under C
    child.expect(STATUS)
    child.expect_exact("> ")
    say(child, f"/save {out}", "saved 4 messages")
    bye(child)
    assert [m["content"] for m in saved(out)["messages"][::2]] == ["Good morrow.", "Good café, sir."]


def test_hostile_inputs_are_one_line_each_and_the_history_stays(tmp_path):
    """A table of hostile commands against one running chat: each is one line, nothing changes."""
    session = {"format": SESSION_FORMAT, "system": None, "settings": {}, "messages": []}
    files = {
        "list": json.dumps([1, 2, 3]),
        "deep": "[" * 100_000 + "]" * 100_000,
        "deep_dict": '{"a":' * 65 + "1" + "}" * 65,
        "big": " " * (16 * 2**20 + 1),
        "role": json.dumps({**session, "messages": [{"role": "robot", "content": "beep"}]}),
        "content": json.dumps({**session, "messages": [{"role": "user", "content": 5}]}),
        "surrogate": json.dumps({**session, "messages": [{"role": "user", "content": "\ud800"}]}),
        "system": json.dumps({**session, "system": 5}),
        "settings_list": json.dumps({**session, "settings": [0.5]}),
        "unknown": json.dumps({**session, "settings": {"colour": "blue"}}),
        "nan": json.dumps({**session, "settings": {"temperature": float("nan")}}),
        "seed": json.dumps({**session, "settings": {"seed": 2**64}}),
        "bool": json.dumps({**session, "settings": {"top_k": True}}),
        "utf16": "{}".encode("utf-16"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "binary").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (tmp_path / "dir").mkdir()
    foreign = tmp_path / "foreign.txt"
    foreign.write_bytes(b"\x00precious bytes\xff\n")
    d = tmp_path
    table = [
        ("/set temperature nan", "error: temperature nan must be a finite number >= 0"),
        ("/set temperature inf", "error: temperature inf must be"),
        ("/set temp -inf", "error: temperature -inf must be"),
        ("/set seed 18446744073709551616", "error: seed 18446744073709551616 must be a whole number from 0 to 2^63-1"),
        ("/set seed -1", "error: seed -1 must be"),
        ("/set repeat_penalty 1e-300", "error: repeat penalty 1e-300 must be a number from 0.01 to 100"),
        ("/set top_p 0", "error: top-p 0.0 must be a number in (0, 1]"),
        ("/set top_k 2.5", "error: top-k needs a whole number, not '2.5'"),
        ("/set max_tokens 0", "error: max tokens 0 must be a whole number >= 1"),
        (f"/load {d}/list", "(the top level is a JSON list, not an object); the conversation is unchanged"),
        (f"/load {d}/deep", "(JSON nested deeper than 64 levels)"),
        (f"/load {d}/deep_dict", "(JSON nested deeper than 64 levels)"),
        (f"/load {d}/big", "is 16.0 MiB, over the 16 MiB that /load reads"),
        (f"/load {d}/role", '(message 0 is not {"role": "user"|"assistant"|"system", "content": text})'),
        (f"/load {d}/content", "(message 0 is not"),
        (f"/load {d}/surrogate", "(message 0 is not"),
        (f"/load {d}/system", '("system" is neither text nor null)'),
        (f"/load {d}/settings_list", '("settings" is not an object)'),
        (f"/load {d}/unknown", "(unknown setting 'colour')"),
        (f"/load {d}/nan", "has a bad setting: temperature nan must be"),
        (f"/load {d}/seed", "has a bad setting: seed 18446744073709551616 must be"),
        (f"/load {d}/bool", "has a bad setting: top-k True must be"),
        (f"/load {d}/utf16", "(not UTF-8 text)"),
        (f"/load {d}/fifo", "is a FIFO (named pipe); /load reads regular files only"),
        (f"/load {d}/dir", "is a directory; /load reads regular files only"),
        ("/read /dev/zero", "/dev/zero is a character device; /read reads regular files only"),
        (f"/read {d}/dir", "is a directory; /read reads regular files only"),
        (f"/read {d}/fifo", "is a FIFO (named pipe); /read reads regular files only"),
        (f"/read {d}/binary", "is not UTF-8 text: /read sends text files only"),
        (f"/save {foreign}", "exists and is not a saved moestream chat; moestream never overwrites a file it did not"),
        (f"/save {d}/fifo", "exists and is not a regular file"),
        (f"/save {d}/dir", "exists and is not a regular file"),
        (f"/save {d}/no/such/dir/x.json", "a directory on the way does not exist; nothing was changed"),
        ("/read", "error: usage: /read FILE"),
        ("/save", "error: usage: /save FILE"),
    ]
    assert len(table) >= 12
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    child = spawn("--temp", "0", "-s", "5")
    say(child, "Good morrow.")
    say(child, f"/save {before}", "saved 2 messages")
    for command, words in table:
        line = one_line(child, command, words)
        assert "Traceback" not in line and "internal error" not in line
    say(child, f"/save {after}", "saved 2 messages")
    bye(child)
    assert saved(after) == saved(before)  # the messages and every setting as they were
    assert foreign.read_bytes() == b"\x00precious bytes\xff\n"


# --- ChatSession without a model: saves that fail, Ctrl+C in a command ---------------------------

class FakeLLM:
    """What ChatSession needs of an LLM: a reply of "Hi", counters, a model name."""

    runtime = SimpleNamespace(model=Path("/models/fake"))

    def __init__(self, complete=None):
        self.complete = complete or (lambda messages, params, stream: stream("Hi"))

    def reset(self):
        pass

    def stats(self):
        return SimpleNamespace(prompt_tps=1.0, generation_tps=1.0, cache_slots=0, cpu_experts=0, kv_tokens=0,
                               kv_tokens_host=0, kv_tokens_disk=0)


def session(llm=None, history=None):
    s = ChatSession(llm or FakeLLM(), SamplingParams(temperature=0), None, Console(file=io.StringIO()), False)
    s.history = list(history or [])
    return s


TWO = [{"role": "user", "content": "Good morrow."}, {"role": "assistant", "content": "And you, sir."}]


def no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def no_space_after_10_bytes(fd, data, write=os.write):
    write(fd, bytes(data[:10]))
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("name,fault", [("fsync", no_space), ("write", no_space_after_10_bytes)])
def test_a_save_that_fails_mid_write_leaves_the_old_session_loadable(tmp_path, monkeypatch, name, fault):
    path = tmp_path / "chat.json"
    s = session(history=TWO)
    s.save(str(path))
    old = path.read_bytes()
    s.history += [{"role": "user", "content": "What news?"}, {"role": "assistant", "content": "None."}]
    with monkeypatch.context() as m:
        m.setattr(os, name, fault)
        with pytest.raises(MoestreamError, match="the disk is full: free space there or choose another place; "
                                                 "nothing was changed"):
            s.save(str(path))
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["chat.json"]  # no temporary left behind
    fresh = session()
    assert fresh.load(str(path)) == f"loaded 2 messages from {path}" and fresh.history == TWO


def inputs(monkeypatch, *lines):
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)


def test_ctrl_c_during_a_blocking_read_returns_to_the_prompt(tmp_path, monkeypatch):
    slow, out = tmp_path / "slow.txt", tmp_path / "out.json"
    slow.write_text("a long file on a slow disk")
    s = session(history=TWO)
    real, calls = os.read, []

    def read(fd, n):  # the read blocks; Ctrl+C arrives in it
        calls.append(fd)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(fd, n)

    inputs(monkeypatch, f"/read {slow}", f"/save {out}", "/bye")
    with monkeypatch.context() as m:
        m.setattr(os, "read", read)
        loop(s, s.console)
    shown = s.console.file.getvalue()
    assert "[interrupted: back at the prompt; the conversation is kept]" in shown and len(calls) >= 1
    assert f"saved 2 messages to {out}" in shown
    assert saved(out)["messages"] == TWO and s.history == TWO


def test_an_interrupted_or_failed_reply_adds_no_turn_and_regen_keeps_the_old_reply():
    def interrupt(messages, params, stream):
        raise KeyboardInterrupt

    def fail(messages, params, stream):
        raise RuntimeError("boom")

    for complete, raised in [(interrupt, None), (fail, RuntimeError)]:
        s = session(FakeLLM(complete), TWO)
        for act in (lambda: s.reply("What news?"), s.regen):
            if raised:
                with pytest.raises(raised):
                    act()
            else:
                assert act() is True
            assert s.history == TWO


def test_a_second_ctrl_c_after_an_interrupted_command_still_exits_130(tmp_path, monkeypatch):
    s = session(history=TWO)
    feed = iter([f"/read {tmp_path}", None, None])

    def fake_input(prompt=""):
        line = next(feed)
        if line is None:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    with pytest.raises(SystemExit) as e:
        loop(s, s.console)
    assert e.value.code == 130 and s.history == TWO


def test_deep_json_is_refused_without_recursion_error():
    for deep in ("[" * 1_000_000 + "]" * 1_000_000, "[" * 500 + "]" * 500, '{"a":' * 65 + "1" + "}" * 65):
        with pytest.raises(ValueError, match="nested deeper than 64 levels"):
            parse_session(deep.encode())
    assert parse_session(("[" * 64 + "]" * 64).encode()) is not None
    assert json_depth(json.loads('{"a": "[[[[", "b": [[]], "c": {"d": 1}}')) == 3 and json_depth(5) == 0


def test_a_bug_in_a_command_is_one_line_with_a_crash_log(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s = session(history=TWO)

    def broken_stats():
        raise ZeroDivisionError("division by zero")

    s.llm.stats = broken_stats
    inputs(monkeypatch, "/stats", "/bye")
    loop(s, s.console)
    shown = s.console.file.getvalue()
    m = re.search(r"error: internal error \(ZeroDivisionError: division by zero\); the conversation is kept; "
                  r"details in (\S+)", shown)
    assert m and "ZeroDivisionError" in Path(m.group(1)).read_text() and s.history == TWO
