"""Two annotate jobs on one output directory: the second refuses at once; a killed job leaves no stuck lock."""

import os
import signal
import subprocess
import sys
import time

import pytest

from annotate.run import main
from annotate.steps import LOCK_NAME, OutputLock
from tests.conftest import REPO

HOLD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from annotate.steps import OutputLock
OutputLock(Path({out!r})).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(out) -> subprocess.Popen:
    """Another process holding ``out``'s lock, as a running job does; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO), out=str(out))], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_job_refuses_naming_the_running_one_and_a_killed_job_leaves_no_lock(tmp_path, lima_slice, smol_tokenizer_dir, capsys):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        start = time.perf_counter()
        rc = main(["--input", str(lima_slice), "--model", str(smol_tokenizer_dir), "--scorers", "tfidf", "--output", str(out)])
        assert rc == 2
        assert time.perf_counter() - start < 60  # at once: before Ray starts
        err = capsys.readouterr().err
        assert f"{out} is in use by a running annotate job (pid {holder.pid} on " in err and "-c" in err
        assert not list(out.glob("shard-*"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's file stays, but the kernel dropped its lock: the next job takes it.
    assert (out / LOCK_NAME).exists()
    lock = OutputLock(out)
    lock.acquire()
    assert f"pid {os.getpid()} " in (out / LOCK_NAME).read_text()
    with pytest.raises(OSError, match="in use by a running annotate job"):
        OutputLock(out).acquire()  # held: even by the same process, a second holder is refused
    lock.release()
    assert not (out / LOCK_NAME).exists()
    again = OutputLock(out)
    again.acquire()
    again.release()
