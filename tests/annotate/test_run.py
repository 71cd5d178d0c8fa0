"""End-to-end: annotate/run.py through a real local Ray on a LIMA slice."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from annotate.run import main
from schemas.shard import INPUT_IDS, LOSS_MASK, Manifest, score_column
from schemas.validate import validate_directory
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _rows(directory):
    tables = [pq.read_table(p) for p in sorted(Path(directory).glob("shard-*.parquet"))]
    out = []
    for t in tables:
        out.extend(t.to_pylist())
    return out


def test_lima_slice_end_to_end(tmp_path, lima_slice, tiny_llama_dir, tiny_llama_ref_dir):
    out = tmp_path / "lima"
    rc = main(["--input", str(lima_slice), "--format", "lima", "--model", str(tiny_llama_dir),
               "--scorers", "tfidf,ref_loss,base_loss", "--scorer-option", f"ref_loss.model={tiny_llama_ref_dir}",
               "--output", str(out), "--shard-size", "10"])
    assert rc == 0
    # The job's own local Ray (still up: one per test module) got the patient health checks of annotate.pipeline.
    import ray._private.worker as ray_worker

    from annotate.pipeline import LOCAL_RAY_SYSTEM_CONFIG

    assert ray_worker._global_node._ray_params._system_config.items() >= LOCAL_RAY_SYSTEM_CONFIG.items()
    report = validate_directory(out)
    assert report.ok, report.problems
    manifest = Manifest.load(out)
    lines = [l for l in lima_slice.read_text().splitlines() if l.strip()]
    assert manifest.totals["rows"] == len(lines) and manifest.rejected == {}
    assert [s.path for s in manifest.shards] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert manifest.scorer_names == ["tfidf", "ref_loss", "base_loss"]
    assert set(manifest.score_stats) == {"tfidf", "ref_loss", "base_loss", "excess_loss"}
    assert manifest.score_stats["tfidf"]["count"] == manifest.totals["trainable_tokens"]
    rows = _rows(out)
    multi = [r for r in rows if sum(1 for a, b in zip(r[LOSS_MASK], r[LOSS_MASK][1:]) if b and not a) >= 2]
    assert multi, "the slice holds multi-turn examples: several trainable runs"
    for r in rows:
        n = len(r[INPUT_IDS])
        assert all(len(r[score_column(s)]) == n for s in manifest.scorer_names)
        assert r[score_column("ref_loss")][0] == 0.0
    assert not np.allclose(rows[0][score_column("ref_loss")], rows[0][score_column("base_loss")])
    assert not (out / "_work").exists()
    assert json.loads((out / "_annotate_summary.json").read_text())["totals"]["rows"] == len(lines)

    # --add-scorers of a column the directory already has is refused before Ray work starts.
    rc = main(["--output", str(out), "--model", str(tiny_llama_dir), "--add-scorers", "base_loss"])
    assert rc == 2


def test_add_scorers_and_tokenizer_mismatch(tmp_path, lima_slice, tiny_llama_dir, smol_tokenizer_dir, capsys):
    out = tmp_path / "add"
    assert main(["--input", str(lima_slice), "--model", str(tiny_llama_dir), "--scorers", "tfidf",
                 "--output", str(out), "--shard-size", "12"]) == 0
    before = {r["id"]: r for r in _rows(out)}
    assert main(["--output", str(out), "--model", str(tiny_llama_dir), "--add-scorers", "base_loss"]) == 0
    assert validate_directory(out).ok
    after = {r["id"]: r for r in _rows(out)}
    assert before.keys() == after.keys()
    for key, row in after.items():
        assert row[INPUT_IDS] == before[key][INPUT_IDS] and row[score_column("tfidf")] == before[key][score_column("tfidf")]
        assert len(row[score_column("base_loss")]) == len(row[INPUT_IDS])
    assert Manifest.load(out).scorer_names == ["tfidf", "base_loss"]

    other = tmp_path / "other_tokenizer"
    shutil.copytree(tiny_llama_dir, other)
    (other / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    capsys.readouterr()
    assert main(["--output", str(out), "--model", str(other), "--add-scorers", "ref_loss",
                 "--scorer-option", f"ref_loss.model={tiny_llama_dir}"]) == 2
    assert "--add-scorers needs the same tokenizer" in capsys.readouterr().err


def test_summary_counts_the_rows_and_tokens_each_stage_processed(tmp_path, lima_slice, tiny_llama_dir, capsys):
    """The corpus pass (tfidf:fit) and the write stage report what they read and wrote, in a first annotate and in
    --add-scorers (issue 30: the summary said 'tfidf:fit 0 rows' and 'write 120 rows 0 tokens')."""
    out = tmp_path / "counts"
    assert main(["--input", str(lima_slice), "--model", str(tiny_llama_dir), "--scorers", "base_loss",
                 "--output", str(out), "--shard-size", "12"]) == 0
    totals = Manifest.load(out).totals
    rows, tokens = totals["rows"], totals["tokens"]
    assert rows > 12 and tokens > rows  # several shards, several tokens a row
    stages = json.loads((out / "_annotate_summary.json").read_text())["stages"]
    assert (stages["write"]["rows"], stages["write"]["tokens"]) == (rows, tokens)
    assert (stages["base_loss"]["rows"], stages["base_loss"]["tokens"]) == (rows, tokens)

    capsys.readouterr()
    assert main(["--output", str(out), "--add-scorers", "tfidf"]) == 0
    printed = capsys.readouterr().out
    stages = json.loads((out / "_annotate_summary.json").read_text())["stages"]
    for stage in ("tfidf:fit", "tfidf", "write"):
        assert (stages[stage]["rows"], stages[stage]["tokens"]) == (rows, tokens), (stage, stages[stage])
        assert re.search(rf"^  {re.escape(stage)}\s+{rows:,} rows\s+{tokens:,} tokens ", printed, re.M), printed
    assert Manifest.load(out).totals["tokens"] == tokens


def test_annotate_then_add_scorers_then_the_same_annotate_again(tmp_path, lima_slice, tiny_llama_dir, capsys):
    """The demo's sequence: the first annotate rerun after --add-scorers (finished or interrupted) redoes nothing."""
    out = tmp_path / "seq"
    first = ["--input", str(lima_slice), "--model", str(tiny_llama_dir), "--scorers", "tfidf", "--output", str(out),
             "--shard-size", "12"]
    assert main(first) == 0
    tfidf_only = out / "shard-00000.tfidf-only"
    shutil.copy(out / "shard-00000.parquet", tfidf_only)
    add = ["--output", str(out), "--model", str(tiny_llama_dir), "--add-scorers", "base_loss"]
    capsys.readouterr()
    assert main(add) == 0
    echoed = capsys.readouterr().out.split("== annotate config ==")[1]
    # --add-scorers prints the directory's own settings (its input, shard size, scorers), not this command's defaults.
    assert f"- {lima_slice}" in echoed and "shard_size: 12" in echoed and "scorers:\n- tfidf\n- base_loss" in echoed
    complete = {p.name: p.read_bytes() for p in out.glob("shard-*.parquet")}

    # 1. After a finished --add-scorers: nothing to do, the added column stays.
    assert main(first) == 0
    assert "already complete (2 shards); it also has ['base_loss'], added by --add-scorers; nothing to do" in capsys.readouterr().out
    assert Manifest.load(out).scorer_names == ["tfidf", "base_loss"]
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.parquet")} == complete

    # 2. --add-scorers killed after its last shard, before its manifest: the manifest is finished, with both.
    (out / "_manifest.json").unlink()
    assert main(first) == 0
    assert "with ['base_loss'] added by --add-scorers; writing the manifest" in capsys.readouterr().out
    assert Manifest.load(out).scorer_names == ["tfidf", "base_loss"] and validate_directory(out).ok
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.parquet")} == complete

    # 3. Killed half way (one shard extended, one not): the annotate rerun says so and lists the common column;
    #    rerunning the --add-scorers then finishes it with exactly the uninterrupted bytes.
    shutil.copy(tfidf_only, out / "shard-00000.parquet")
    (out / "_manifest.json").unlink()
    assert main(first) == 0
    printed = capsys.readouterr().out
    assert "some shards also have ['base_loss'], from an --add-scorers run that was interrupted" in printed
    assert Manifest.load(out).scorer_names == ["tfidf"]
    assert main(add) == 0
    assert Manifest.load(out).scorer_names == ["tfidf", "base_loss"] and validate_directory(out).ok
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.parquet")} == complete


def test_bad_input_is_rejected_and_counted(tmp_path, tiny_llama_dir, capsys):
    corpus = tmp_path / "bad.jsonl"
    good = json.dumps({"conversations": ["Hello?", "Hi there."]})
    corpus.write_bytes("\n".join([
        good,
        '{"conversations": ["broken"',
        json.dumps({"conversation": ["a", "b"]}),
        json.dumps({"conversations": "a b"}),
        json.dumps({"conversations": ["Q", "   "]}),
        json.dumps({"conversations": ["long", "word " * 300]}),
        good,
    ]).encode() + b"\n" + b'{"conversations": ["\xff", "x"]}\n' + json.dumps({"conversations": ["Other?", "Yes."]}).encode() + b"\n")
    out = tmp_path / "out"
    rc = main(["--input", str(corpus), "--format", "lima", "--model", str(tiny_llama_dir), "--scorers", "tfidf",
               "--output", str(out), "--max-length", "64", "--overlength", "drop", "--shard-size", "4"])
    assert rc == 0
    manifest = Manifest.load(out)
    assert manifest.totals["rows"] == 2
    assert manifest.rejected == {"duplicate": 1, "empty_response": 1, "invalid_utf8": 1, "malformed_json": 1,
                                 "missing_field": 1, "over_length": 1, "wrong_type": 1}
    rejects = [json.loads(l) for l in (out / "_rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "malformed_json"), (3, "missing_field"), (4, "wrong_type"), (5, "empty_response"), (6, "over_length"),
        (7, "duplicate"), (8, "invalid_utf8")]
    assert all(r["file"] == str(corpus) for r in rejects)

    strict_out = tmp_path / "strict"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    rc = main(["--input", str(corpus), "--format", "lima", "--model", str(tiny_llama_dir), "--scorers", "tfidf",
               "--output", str(strict_out), "--strict"])
    assert rc == 1
    assert f"{corpus}:2: malformed_json" in capsys.readouterr().err
    # The job's own Ctrl-C / SIGTERM handlers are gone once it returns, on its failure path too.
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def _run_cli(args, env=None):
    return subprocess.Popen([sys.executable, str(REPO / "annotate" / "run.py"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)


def test_kill_and_resume_gives_the_uninterrupted_output(tmp_path, job_args, reference):
    args = job_args

    out = tmp_path / "killed"
    proc = _run_cli([*args, "--output", str(out)])
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("shard-*.parquet"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the job and everything it started
    proc.wait()
    finished = len(list(out.glob("shard-*.parquet")))
    assert 2 <= finished < 8, "the kill must land mid-job"
    assert not (out / "_manifest.json").exists()

    assert main([*args, "--output", str(out)]) == 0
    assert validate_directory(out).ok
    ours, theirs = Manifest.load(out), Manifest.load(reference)
    assert [(s.path, s.rows, s.sha256) for s in ours.shards] == [(s.path, s.rows, s.sha256) for s in theirs.shards]
    assert ours.totals == theirs.totals
    assert _rows(out) == _rows(reference)
    assert main([*args, "--output", str(out)]) == 0  # a finished directory: nothing to do


# Ctrl-C as a terminal sends it, to the whole process group; SIGTERM as `kill PID` does, to the job alone,
# and as `kill -TERM -PGID` (a supervisor stopping a job and everything it started) does, Ray's own
# processes included.
@pytest.mark.parametrize("sig,code,name,group", [(signal.SIGINT, 130, "Ctrl-C", True), (signal.SIGTERM, 143, "SIGTERM", False),
                                                 (signal.SIGTERM, 143, "SIGTERM", True)],
                         ids=["ctrl-c", "sigterm-job", "sigterm-group"])
def test_signal_stops_with_one_line_and_the_rerun_finishes(tmp_path, job_args, reference, sig, code, name, group):
    args = job_args
    out, log = tmp_path / "stopped", tmp_path / "stopped.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(REPO / "annotate" / "run.py"), *args, "--output", str(out)], cwd=REPO,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("shard-*.parquet"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, sig) if group else os.kill(proc.pid, sig)
    sent = time.time()
    try:
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.time() - sent < 30
    text = log.read_text()
    # A group SIGTERM also stops the raylet, and Ray's core worker may end the driver (exit 1) before Python's handler
    # runs: a race inside Ray, seen twice under load (stops 34 and 37). Then the line is missing, but nothing is lost:
    # the rerun below must still finish with the uninterrupted output.
    raced = group and sig == signal.SIGTERM and returncode == 1 and "interrupted" not in text
    assert returncode == code or raced, text[-3000:]
    if not raced:
        lines = [line for line in text.splitlines() if line.startswith("interrupted")]
        assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
        assert "Token authentication is enabled" not in text  # Ray's per-run notice, silenced (token auth stays on)
        done = len(list(out.glob("shard-*.parquet")))
        assert lines[0] == (f"interrupted ({name}) writing {out}: {done} of 8 shards finished and kept; "
                            f"the same command resumes with the other {8 - done}")
        assert not list(out.glob("*.tmp*"))
    assert not (out / "_manifest.json").exists()
    assert main([*args, "--output", str(out)]) == 0
    assert _rows(out) == _rows(reference)


def _score_actor_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "^ray::ScoreActor"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def test_scorer_actor_killed_mid_job_is_restarted_and_the_output_is_the_uninterrupted_one(tmp_path, job_args, reference):
    out, log = tmp_path / "actor_killed", tmp_path / "actor_killed.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(REPO / "annotate" / "run.py"), *job_args,
                                 "--output", str(out)], cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(out.glob("shard-*.parquet")):
            time.sleep(0.05)
        killed = _score_actor_pids()
        assert killed and len(list(out.glob("shard-*.parquet"))) < 8, "the kill must land mid-job, with scorer actors up"
        for pid in killed:
            os.kill(pid, signal.SIGKILL)  # as the OOM killer would
        assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert validate_directory(out).ok
    assert _rows(out) == _rows(reference)
    assert [(s.path, s.sha256) for s in Manifest.load(out).shards] == [(s.path, s.sha256) for s in Manifest.load(reference).shards]


def test_worker_node_removed_mid_job_finishes_on_what_remains(tmp_path, job_args, reference):
    """A head with no CPUs and two worker nodes (ray.cluster_utils.Cluster, separate raylets on this
    machine): all the job's work runs on the workers; one of them is removed once the first shard is
    written. Ray restarts the actors and retries the tasks it hosted on the other; the output is the
    uninterrupted one's."""
    from ray.cluster_utils import Cluster

    # Ray notices a dead node after missed health checks (30 s by default): a second, here.
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health})
    try:
        cluster.add_node(num_cpus=2)
        doomed = cluster.add_node(num_cpus=2)
        out, log = tmp_path / "node_removed", tmp_path / "node_removed.log"
        env = dict(os.environ, RAY_ADDRESS=cluster.address)
        with open(log, "w") as sink:
            proc = subprocess.Popen([sys.executable, str(REPO / "annotate" / "run.py"), *job_args, "--output", str(out)],
                                    cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and not list(out.glob("shard-*.parquet")) and proc.poll() is None:
                time.sleep(0.05)
            assert len(list(out.glob("shard-*.parquet"))) < 8, "the removal must land mid-job"
            cluster.remove_node(doomed, allow_graceful=False)
            assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        cluster.shutdown()
    assert validate_directory(out).ok
    assert _rows(out) == _rows(reference)
    assert [(s.path, s.sha256) for s in Manifest.load(out).shards] == [(s.path, s.sha256) for s in Manifest.load(reference).shards]
    nodes = json.loads((out / "_annotate_summary.json").read_text())["nodes"]
    assert nodes and all(n["stages"] for n in nodes)


def test_disk_full_mid_write_names_the_file_keeps_what_was_finished_and_the_rerun_completes(tmp_path, job_args, reference, capsys):
    """The output on a 400 KB tmpfs (the job writes ~1 MB): the job stops with a clear error naming the
    file, no partial shard or temporary file stays; after the space is grown, the same command finishes
    with exactly the uninterrupted output."""
    fs = tmp_path / "small_fs"
    fs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(fs)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        out = fs / "out"
        capsys.readouterr()
        assert main([*job_args, "--output", str(out)]) == 1
        err = capsys.readouterr().err
        assert "No space left on device" in err and f"cannot write {out}/" in err and "Traceback" not in err, err[-3000:]
        for shard in out.glob("shard-*.parquet"):  # every shard on disk is whole
            assert pq.read_table(shard).num_rows > 0
        assert not list(out.rglob("*.tmp")) and not (out / "_manifest.json").exists()

        subprocess.run(["mount", "-o", "remount,size=16m", str(fs)], check=True)
        assert main([*job_args, "--output", str(out)]) == 0
        assert _rows(out) == _rows(reference)
        assert [(s.path, s.sha256) for s in Manifest.load(out).shards] == [(s.path, s.sha256) for s in Manifest.load(reference).shards]
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)
