"""Nothing lost, nothing crashes: every file moestream reads or writes for expert offload and the KV disk tier.

- `--kv-disk`: a file that is not ours is refused and left byte-identical; a second process is
  refused; the file is 0600, empty at the start of every conversation and gone after close.
- The repacked expert file: one per (checkpoint, layout, dtype), built under a lock (two processes
  at once end with one valid file), checked block by block (corruption in place is detected, never
  used), and no temporary survives an interrupted build.
- Checkpoint headers: every malformed offset or entry is one line naming the file and the tensor.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moestream
from moestream import MoestreamError
from moestream.cache.kv import KVCache, KVDisk, KVLayout
from moestream.model.checkpoint import Checkpoint
from moestream.model.formats import FORMATS
from moestream.model.sampling import SamplingParams
from moestream.offload.store import RepackedFile

from .conftest import VOCAB
from .test_kv_tiers import spill_budgets

ROOT = os.path.dirname(os.path.dirname(__file__))
PROMPT = torch.randint(3, VOCAB, (29,), generator=torch.Generator().manual_seed(11))
# one cache slot (a tiny expert is 3 x 64 x 32 float32 = 24 KiB), every expert read from the disk tier
OFFLOAD = dict(expert_cache=3 * 64 * 32 * 4, cpu_mem=0, cpu_experts="never")


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the KV disk file --------------------------------------------------------------------------------
def kv_kwargs(path, disk) -> dict:
    return spill_budgets(path, hot=16, host_blocks=2, block=4, ubatch=6, disk=disk)


@pytest.mark.parametrize("foreign", ["a model shard", "an empty file", "random bytes"])
def test_foreign_file_at_kv_disk_is_refused_and_left_byte_identical(tiny, tmp_path, foreign):
    path, _ = tiny("scout")
    disk = tmp_path / "model.safetensors"
    content = {"a model shard": (path / "model.safetensors").read_bytes(), "an empty file": b"",
               "random bytes": os.urandom(1 << 16)}[foreign]
    disk.write_bytes(content)
    before = disk.stat()
    with pytest.raises(MoestreamError, match="is not a moestream KV file") as info:
        moestream.load(path, **kv_kwargs(path, disk))
    assert "--kv-disk" in one_line(info)
    assert disk.read_bytes() == content and disk.stat().st_mode == before.st_mode


def test_directory_at_kv_disk_is_refused(tiny, tmp_path):
    path, _ = tiny("scout")
    (tmp_path / "kv").mkdir()
    with pytest.raises(MoestreamError, match="is not a regular file") as info:
        moestream.load(path, **kv_kwargs(path, tmp_path / "kv"))
    assert "--kv-disk" in one_line(info)


SECOND_KV = r"""
import sys, moestream
from tests.test_kv_tiers import spill_budgets
path, disk = sys.argv[1:3]
try:
    moestream.load(path, **spill_budgets(path, hot=16, host_blocks=2, block=4, ubatch=6, disk=disk))
except moestream.MoestreamError as e:
    print(e)
    sys.exit(3)
"""


def test_second_process_on_the_same_kv_file_is_refused(tiny, tmp_path):
    path, _ = tiny("scout")
    disk = tmp_path / "kv.bin"
    llm = moestream.load(path, **kv_kwargs(path, disk))
    params = SamplingParams(temperature=0, max_tokens=4)
    prompt = torch.randint(3, VOCAB, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    first = llm.generate_ids(prompt, params, stop_ids=set())
    assert llm.stats().kv.tokens_disk > 0
    held = disk.read_bytes()
    r = subprocess.run([sys.executable, "-c", SECOND_KV, str(path), str(disk)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 3, r.stderr
    message = r.stdout.strip()
    assert "\n" not in message and "in use by another moestream process" in message and "--kv-disk" in message
    assert disk.read_bytes() == held  # the refused process touched nothing
    llm.reset()
    assert llm.generate_ids(prompt, params, stop_ids=set()) == first  # the holder carries on
    llm.close()


def test_kv_file_is_private_empty_per_conversation_and_gone_after_close(tiny, tmp_path):
    path, _ = tiny("scout")
    disk = tmp_path / "kv.bin"
    old = os.umask(0)  # even a permissive umask gives 0600
    try:
        llm = moestream.load(path, **kv_kwargs(path, disk))
    finally:
        os.umask(old)
    assert disk.stat().st_mode & 0o777 == 0o600
    assert disk.read_bytes() == KVDisk.HEADER  # created at load, with our header, before anything spills
    resident = moestream.load(path)
    params = SamplingParams(temperature=0, max_tokens=4)
    a = torch.randint(3, VOCAB, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    b = torch.randint(3, VOCAB, (60,), generator=torch.Generator().manual_seed(4)).tolist()
    assert llm.generate_ids(a, params, stop_ids=set()) == resident.generate_ids(a, params, stop_ids=set())
    assert disk.stat().st_size > len(KVDisk.HEADER)  # the conversation spilled
    llm.drop(llm.new_sequence())  # a new conversation starts from an empty file: no block of the last one is read
    assert disk.stat().st_size == len(KVDisk.HEADER)
    resident.reset()
    assert llm.generate_ids(b, params, stop_ids=set()) == resident.generate_ids(b, params, stop_ids=set())
    assert llm.stats().kv.tokens_disk > 0
    llm.close()
    assert not disk.exists()


def test_a_kv_cache_built_on_its_own_owns_its_file(tiny, tmp_path):
    llm = moestream.load(tiny("scout")[0])
    disk = tmp_path / "own.kv"
    cache = KVCache(llm.config, llm.device, llm.dtype, KVLayout("f32", "f32", block=4, hot_tokens=8, host_tokens=0,
                                                                disk=disk))
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(6))
    stepped = torch.cat([llm.model.forward(ids[i:i + 4], cache) for i in range(0, 40, 4)])
    assert (stepped - llm.logits(ids)).abs().max().item() < 1e-4
    assert cache.tokens_by_tier()["disk"] > 0 and disk.stat().st_mode & 0o777 == 0o600
    cache.close()
    assert not disk.exists()


# --- the repacked expert file ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resident(tiny):
    """Resident logits of PROMPT, and the experts PROMPT routes to (read once, on first use)."""
    path, _ = tiny("scout")
    llm = moestream.load(path)
    return llm.logits(PROMPT), sorted(llm.experts.loaded)


def expert_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.experts"))


def temporaries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".tmp"))


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        return RepackedFile.read_header(f.fileno())


REPACK = r"""
import os, sys, time, torch, moestream
from safetensors.torch import save_file
from moestream.model.checkpoint import Checkpoint
from tests.test_files import OFFLOAD, PROMPT
path, expert_dir, me, other, out = sys.argv[1:6]
fills = []
read = Checkpoint.read_expert_into
def slow(self, *args):  # a slow disk: the two repacks overlap
    fills.append(args[:2])
    time.sleep(0.02)
    return read(self, *args)
Checkpoint.read_expert_into = slow
open(me, "w").close()
while not os.path.exists(other):  # start together
    time.sleep(0.005)
llm = moestream.load(path, expert_dir=expert_dir, **OFFLOAD)
built = len(fills)
save_file({"logits": llm.logits(PROMPT)}, out)
print(built)
"""


def test_two_processes_repacking_at_once_end_with_one_valid_file(tiny, resident, tmp_path):
    path, _ = tiny("scout")
    expert_dir = tmp_path / "experts"
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    children = [subprocess.Popen([sys.executable, "-c", REPACK, str(path), str(expert_dir), str(ready[i]),
                                  str(ready[1 - i]), str(tmp_path / f"out{i}")], stdout=subprocess.PIPE, cwd=ROOT)
                for i in range(2)]
    built = []
    for child in children:
        stdout, _ = child.communicate(timeout=300)
        assert child.returncode == 0
        built.append(int(stdout))
    c = Checkpoint(path).config
    n = len(c.moe_layers) * c.num_local_experts
    assert sorted(built) == [0, n]  # one built it under the lock; the other waited, then reused it
    for i in range(2):
        assert torch.equal(load_file(str(tmp_path / f"out{i}"))["logits"], resident[0])
    files = expert_files(expert_dir)
    assert len(files) == 1 and not temporaries(expert_dir)
    meta = header(files[0])
    assert meta["format"] == RepackedFile.FORMAT and len(meta["checksums"]) == len(meta["keys"]) == n


@pytest.mark.parametrize("cpu_experts", ["never", "always"])  # read by the copy worker / on the compute thread
def test_repacked_file_corrupted_in_place_is_detected(tiny, resident, tmp_path, cpu_experts):
    path, _ = tiny("scout")
    kw = dict(OFFLOAD, cpu_experts=cpu_experts, expert_dir=tmp_path)
    moestream.load(path, **kw).close()
    [file] = expert_files(tmp_path)
    size = file.stat().st_size
    llm = moestream.load(path, **kw)
    f = llm.experts.store.file
    used = next(key for key in resident[1] if key in f.index)  # an expert PROMPT is routed to
    with open(file, "r+b") as out:  # flip bytes in the middle of its block; the size stays
        at = f.data_start + f.index[used] * f.block + f.nbytes // 2
        out.seek(at)
        good = out.read(8)
        out.seek(at)
        out.write(bytes(b ^ 0xFF for b in good))
    assert file.stat().st_size == size
    with pytest.raises(MoestreamError, match="expert file .* was corrupt .* and has been removed: run again") as info:
        llm.logits(PROMPT)
    one_line(info)
    assert not file.exists() and used not in llm.experts.cache.slot_of  # the half-read slot is not kept
    with pytest.raises(MoestreamError, match="was corrupt"):  # carrying on never uses it either
        llm.logits(PROMPT)
    llm.close()
    llm = moestream.load(path, **kw)  # the next run rebuilds it
    assert torch.equal(llm.logits(PROMPT), resident[0])
    assert len(expert_files(tmp_path)) == 1
    llm.close()


KILLED = r"""
import os, signal, sys, moestream
from moestream.model.checkpoint import Checkpoint
from tests.test_files import OFFLOAD
path, expert_dir = sys.argv[1:3]
read, calls = Checkpoint.read_expert_into, []
def dies(self, *args):
    calls.append(1)
    if len(calls) == 5:  # mid-write: 4 experts are in the temporary
        os.kill(os.getpid(), signal.SIGKILL)
    return read(self, *args)
Checkpoint.read_expert_into = dies
moestream.load(path, expert_dir=expert_dir, **OFFLOAD)
"""


def test_no_temporary_after_an_interrupted_repack_and_a_rerun(tiny, resident, tmp_path):
    path, _ = tiny("scout")
    r = subprocess.run([sys.executable, "-c", KILLED, str(path), str(tmp_path)], cwd=ROOT)
    assert r.returncode == -signal.SIGKILL
    assert len(temporaries(tmp_path)) == 1 and not expert_files(tmp_path)  # what a dead writer leaves
    llm = moestream.load(path, expert_dir=tmp_path, **OFFLOAD)
    assert not temporaries(tmp_path) and len(expert_files(tmp_path)) == 1
    assert torch.equal(llm.logits(PROMPT), resident[0])
    llm.close()


def test_ctrl_c_mid_repack_leaves_no_temporary(tiny, tmp_path, monkeypatch):
    path, _ = tiny("scout")
    read, calls = Checkpoint.read_expert_into, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return read(self, *args)

    monkeypatch.setattr(Checkpoint, "read_expert_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        moestream.load(path, expert_dir=tmp_path, **OFFLOAD)
    assert not temporaries(tmp_path) and not expert_files(tmp_path)


def test_full_disk_while_repacking_is_one_line_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    path, _ = tiny("scout")

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("moestream.offload.store.os.pwrite", full)
    with pytest.raises(MoestreamError, match="cannot write the expert file") as info:
        moestream.load(path, expert_dir=tmp_path, **OFFLOAD)
    message = one_line(info)
    assert "the disk is full" in message and "GiB" in message and "--expert-dir" in message and "--cpu-mem" in message
    assert not temporaries(tmp_path) and not expert_files(tmp_path)


def test_stale_files_of_this_checkpoint_go_and_others_stay(tiny, tmp_path):
    scout, _ = tiny("scout")
    maverick, _ = tiny("maverick")
    moestream.load(maverick, expert_dir=tmp_path, **OFFLOAD).close()
    [theirs] = expert_files(tmp_path)
    foreign = tmp_path / "notes.experts"
    foreign.write_bytes(b"not ours")
    llm = moestream.load(scout, expert_dir=tmp_path, **OFFLOAD)  # every expert on disk
    all_on_disk = llm.experts.store.file.path
    llm.close()
    # another layout and dtype (float32 experts on the CPU are repacked output-major, all of them into
    # one file whatever the layout: the dtype makes it another file)
    llm = moestream.load(scout, expert_dir=tmp_path, **dict(OFFLOAD, cpu_mem="100KB", expert_dtype="int8"))
    some_on_disk = llm.experts.store.file.path
    assert 0 < len(llm.experts.store.host_keys) and some_on_disk != all_on_disk
    llm.close()
    assert expert_files(tmp_path) == sorted([theirs, foreign, some_on_disk])  # one file per (checkpoint, layout, dtype)
    assert foreign.read_bytes() == b"not ours" and header(theirs)["checkpoint"] == str(maverick.resolve())


# --- checkpoint headers ------------------------------------------------------------------------------
VICTIM = "model.layers.1.feed_forward.experts.gate_up_proj"


def rewrite_header(shard: Path, change) -> None:
    """Replace a safetensors header by change(header) (same data section, new length)."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = json.dumps(change(json.loads(raw[8:8 + n]))).encode()
    shard.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


def broken_copy(tiny, tmp_path, change) -> Path:
    path = tmp_path / "scout"
    shutil.copytree(tiny("scout")[0], path)
    rewrite_header(path / "model.safetensors", change)
    return path


def entry(update):
    def change(h):
        h[VICTIM] = update(h[VICTIM])
        return h
    return change


def shifted(by):
    return entry(lambda e: dict(e, data_offsets=[e["data_offsets"][0] + by, e["data_offsets"][1] + by]))


HEADERS = {
    "a list": (lambda h: list(h.items()), r"corrupt safetensors header \(a JSON list, not an object\)"),
    "an entry that is not an object": (entry(lambda e: [e["dtype"], e["shape"]]), "header entry that is a JSON list"),
    "no data_offsets": (entry(lambda e: {k: v for k, v in e.items() if k != "data_offsets"}), "lacks data_offsets"),
    "no shape": (entry(lambda e: {k: v for k, v in e.items() if k != "shape"}), "lacks shape"),
    "string offsets": (entry(lambda e: dict(e, data_offsets=[str(x) for x in e["data_offsets"]])), "not two integers"),
    "negative offsets": (entry(lambda e: dict(e, data_offsets=[-4, e["data_offsets"][1]])), "negative data_offsets"),
    "reversed offsets": (entry(lambda e: dict(e, data_offsets=e["data_offsets"][::-1])), "end before they begin"),
    "a span unlike its shape": (entry(lambda e: dict(e, data_offsets=[e["data_offsets"][0], e["data_offsets"][1] - 4])),
                                r"spans \d+ bytes but its shape"),
    "overlapping offsets": (shifted(-4), "overlaps tensor"),
    "a gap": (shifted(+4), "leaving a gap"),
    "a span beyond the file": (shifted(1 << 30), "is truncated: tensor .* ends at byte"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_malformed_header_is_one_line(tiny, tmp_path, case):
    change, match = HEADERS[case]
    path = broken_copy(tiny, tmp_path, change)
    with pytest.raises(MoestreamError, match=match) as info:
        moestream.load(path)
    message = one_line(info)
    assert message.startswith("model.safetensors ") and "re-download it" in message
    if case != "a list":
        assert VICTIM in message


def test_malformed_expert_offset_is_one_line_on_the_fast_path(tiny, tmp_path):
    """The offload path that reads experts straight from the checkpoint (os.preadv at the header's
    offsets) never sees a malformed one: it is refused with the file and tensor named."""
    path = broken_copy(tiny, tmp_path, shifted(-4))
    assert Checkpoint(tiny("scout")[0]).reads_raw(FORMATS["f32"])  # float32 checkpoint, f32 experts: raw reads
    with pytest.raises(MoestreamError, match=f"model.safetensors is corrupt: tensor {VICTIM} overlaps") as info:
        moestream.load(path, expert_dir=tmp_path, repack=False, **OFFLOAD)
    assert "re-download it" in one_line(info)


def test_shard_truncated_after_load_is_one_line_on_the_fast_path(tiny, tmp_path):
    path = tmp_path / "scout"
    shutil.copytree(tiny("scout")[0], path)
    ck = Checkpoint(path)
    assert ck.reads_raw(FORMATS["f32"])
    shard = path / "model.safetensors"
    os.truncate(shard, ck.tensors["model.layers.0.feed_forward.experts.gate_up_proj"].offset + 8)
    out = torch.empty(FORMATS["f32"].nbytes(ck.config.hidden_size, ck.config.intermediate_size), dtype=torch.uint8)
    with pytest.raises(MoestreamError, match="model.safetensors ended early while reading expert 3 of layer 0") as info:
        ck.read_expert_into(0, 3, out, FORMATS["f32"])
    assert "re-download it" in one_line(info)


def test_routing_trace_never_overwrites_a_foreign_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(MoestreamError, match="not a moestream routing trace") as info:
        moestream.load(record_routing=notes)
    assert "\n" not in str(info.value) and notes.read_text() == "my notes"
    trace = tmp_path / "t.jsonl"
    moestream.load(record_routing=trace).close()
    moestream.load(record_routing=trace).close()  # our own trace: replaced
    assert trace.read_text().startswith('{"format": "moestream-routing/1"')


def test_profile_never_overwrites_foreign_files(tmp_path):
    (tmp_path / "summary.json").write_text('{"mine": true}')
    with pytest.raises(MoestreamError, match="not a moestream profile summary") as info:  # at load, not after the run
        moestream.load(profile=tmp_path)
    assert "\n" not in str(info.value)
    assert (tmp_path / "summary.json").read_text() == '{"mine": true}'
    again = tmp_path / "again"
    for _ in range(2):  # a profile directory of our own is rewritten
        llm = moestream.load(profile=again)
        llm.generate("ROMEO:", max_tokens=2)
        llm.close()
    assert (again / "report.md").read_text().startswith("# moestream profile")
