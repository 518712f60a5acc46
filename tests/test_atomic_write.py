"""Atomic writes: a writer killed at any moment leaves the previous file intact (or no file),
never a part of the new one.

A helper process (numpy only, one BLAS thread) forks a writer that saves two containers
in turn over one path, again and again; the test kills it with SIGKILL after a random
delay, waits until it is dead and looks at the path. Temporary files of killed writers
remain (named ``.kpk-<random>.tmp``, never the target's name): the writer does not
delete them on its next run, since one may belong to another writer still running.
A write that fails (a full disk, a read-only folder) raises KernelpackError, keeps the
old file and removes its temporary file; any name the file system allows can be written.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import kernelpack
from kernelpack import KernelpackError

KILLS = 100
KILLS_WITHOUT_FILE = 20

HELPER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import kernelpack

    def tensors(seed):
        rng = np.random.default_rng(seed)
        return {"w": rng.standard_normal(1 << 20).astype(np.float32),
                "zeros": np.zeros(1 << 18, np.float32), "step": np.array(seed, np.int64)}

    A, B = tensors(1), tensors(2)
    child = 0
    for line in sys.stdin:
        command, path = line.split()
        if command == "references":  # the two files, written whole, and the time to write both
            start = time.perf_counter()
            kernelpack.save(A, path + ".a", level=1)
            kernelpack.save(B, path + ".b", level=1)
            print(time.perf_counter() - start, flush=True)
        elif command == "write":  # a writer that saves B, A, B, ... over path until killed
            child = os.fork()
            if child == 0:
                turn = 0
                while True:
                    kernelpack.save(B if turn % 2 == 0 else A, path, level=1)
                    turn += 1
            print(child, flush=True)
        elif command == "reap":  # the test killed it: report when it is dead
            os.waitpid(child, 0)
            print("dead", flush=True)
""")


class Helper:
    """The forking helper: one Python start-up for all kill points."""

    def __init__(self) -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, command: str, path: Path) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{command} {path}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, "the helper died"
        return answer

    def kill_writer_after(self, path: Path, delay: float) -> None:
        pid = int(self.ask("write", path))
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        assert self.ask("reap", path) == "dead"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def helper() -> Iterator[Helper]:
    h = Helper()
    yield h
    h.close()


def delays(count: int, cycle: float, seed: int) -> list[float]:
    """Kill times spread evenly, with jitter, over three cycles (six writes), so that kill
    points fall before, inside and after writes even when the machine runs slower than it
    did when ``cycle`` was measured."""
    rng = random.Random(seed)
    return [(i + rng.random()) / count * 3 * cycle for i in range(count)]


def leftovers(folder: Path, target: str) -> list[str]:
    """Files other than the target; each must be a writer's temporary file."""
    others = sorted(p.name for p in folder.iterdir() if p.name != target)
    pattern = re.compile(r"\.kpk-[^/]+\.tmp")
    assert all(pattern.fullmatch(name) for name in others), others
    return others


def test_a_writer_killed_at_any_moment_leaves_the_old_file_or_the_new_one(helper: Helper, tmp_path: Path) -> None:
    references = tmp_path / "references"
    references.mkdir()
    cycle = float(helper.ask("references", references / "ref"))  # writing A then B
    old, new = (references / "ref.a").read_bytes(), (references / "ref.b").read_bytes()
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "model.kpk"
    seen = {"old": 0, "new": 0, "mid-write": 0}
    for delay in delays(KILLS, cycle, seed=0):
        target.write_bytes(old)  # the previous file; the writer saves new, old, new, ... over it
        before = len(leftovers(folder, target.name))
        helper.kill_writer_after(target, delay)
        blob = target.read_bytes()
        assert blob in (old, new), f"a killed writer left {len(blob)} bytes that are neither file"
        seen["old" if blob == old else "new"] += 1
        seen["mid-write"] += len(leftovers(folder, target.name)) > before
    for name in seen:  # kill points before, after and inside a write (else the test proves little)
        assert seen[name] > 0, seen
    for reference in (references / "ref.a", references / "ref.b"):
        kernelpack.load_numpy(reference)  # both outcomes are whole, valid containers


def test_a_writer_killed_before_its_first_rename_leaves_no_file(helper: Helper, tmp_path: Path) -> None:
    cycle = float(helper.ask("references", tmp_path / "ref"))
    new = (tmp_path / "ref.b").read_bytes()
    outcomes = set()
    for i, delay in enumerate(delays(KILLS_WITHOUT_FILE, cycle, seed=1)):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        target = folder / "model.kpk"
        helper.kill_writer_after(target, delay)
        if target.exists():
            assert target.read_bytes() in (new, (tmp_path / "ref.a").read_bytes())
            outcomes.add("file")
        else:
            outcomes.add("none")
        leftovers(folder, target.name)
    assert outcomes == {"file", "none"}, outcomes


def fail_with(code: int):
    """A stand-in for an OS call that fails as the file system would, with ``code``."""
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))
    return fail


#: Where a write can fail, and how: the temporary file cannot be made (a read-only folder,
#: no permission), its data cannot be stored (a full disk reports it at the latest at fsync),
#: the rename fails.
FAILURES = [("tempfile.mkstemp", errno.EROFS), ("tempfile.mkstemp", errno.EACCES),
            ("os.fsync", errno.ENOSPC), ("os.fsync", errno.EIO), ("os.replace", errno.ENOSPC)]


@pytest.mark.parametrize("call, code", FAILURES, ids=[f"{c}-{errno.errorcode[e]}" for c, e in FAILURES])
@pytest.mark.parametrize("existing", [True, False], ids=["over-a-file", "new-file"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int, existing: bool) -> None:
    path = tmp_path / "model.kpk"
    if existing:
        kernelpack.save({"w": np.zeros(3, np.float32)}, path)
    before = path.read_bytes() if existing else None
    module, name = call.split(".")
    monkeypatch.setattr({"os": os, "tempfile": tempfile}[module], name, fail_with(code))
    with pytest.raises(KernelpackError) as caught:
        kernelpack.save({"w": np.ones(1000, np.float32)}, path)
    assert caught.value.path == str(path) and os.strerror(code) in str(caught.value)
    assert (path.read_bytes() if existing else None) == before
    assert os.listdir(tmp_path) == (["model.kpk"] if existing else [])


def longest_names(folder: Path) -> list[str]:
    """Names of exactly NAME_MAX bytes (255 on Linux and macOS), ASCII and 2-byte UTF-8."""
    limit = os.pathconf(folder, "PC_NAME_MAX")
    return ["a" * (limit - 4) + ".kpk", "é" * ((limit - 5) // 2) + "a" * ((limit - 5) % 2 + 1) + ".kpk"]


def test_any_name_the_file_system_allows_can_be_written(tmp_path: Path) -> None:
    """The temporary name does not grow with the target's, so a NAME_MAX-byte name works."""
    for name in longest_names(tmp_path):
        assert len(os.fsencode(name)) == os.pathconf(tmp_path, "PC_NAME_MAX")
        kernelpack.save({"w": np.arange(5, dtype=np.float32)}, tmp_path / name)
        assert kernelpack.load_numpy(tmp_path / name)["w"].tolist() == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path)) == sorted(longest_names(tmp_path))


def test_a_name_too_long_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / ("a" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1))
    with pytest.raises(KernelpackError, match="cannot write: File name too long") as caught:
        kernelpack.save({"w": np.zeros(3, np.float32)}, path)
    assert caught.value.path == str(path) and os.listdir(tmp_path) == []
