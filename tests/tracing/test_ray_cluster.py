"""trace-dataset --address against a real Ray cluster on loopback, with a worker killed mid-run.

The cluster is started with ``ray start --head`` (its own processes, as a user's
cluster would be) and stopped by the test.  Once the first fact is written, one
``ray::FactTracer`` worker process is sent SIGKILL while it traces; Ray restarts
the actor and retries the fact, and the run must finish with every fact written
once and the same scores as a run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lens_rome.tracing.store import FactStore

ray = pytest.importorskip("ray")

ARGS = ["--limit", "4", "--samples", "2", "--kinds", "hidden", "--no-severed", "--boot", "20"]
WORKER = "ray::FactTracer"  # the process title of an actor's worker
COLUMNS = ["known_id", "kind", "sever", "token", "layer"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray(*args: str) -> subprocess.CompletedProcess:
    ray_cli = Path(sys.executable).with_name("ray")
    return subprocess.run([str(ray_cli), *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def _tracing_workers() -> list[int]:
    """Pids of the actor workers now tracing a fact (title ``ray::FactTracer.trace``)."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in listing.splitlines()
            if line.split(None, 1)[1:] and line.split(None, 1)[1].startswith(WORKER + ".trace")]


@pytest.fixture
def cluster(tmp_path):
    """A two-CPU Ray head on 127.0.0.1 at a free port; its address.  Stopped afterwards."""
    port = _free_port()
    temp = Path("/tmp") / f"lr_ray_{port}"  # Ray's socket paths must stay short
    started = _ray("start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                   "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                   "--temp-dir", str(temp))
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _ray("stop", "--force")
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.embedded
@pytest.mark.xdist_group("ray")  # `ray stop` ends every Ray runtime here: one at a time
def test_a_killed_worker_on_a_real_cluster_leaves_each_fact_once_with_local_scores(
        cluster, known_facts, tmp_path, capsys):
    from lens_rome.cli import main

    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(known_facts[:40]))
    out = tmp_path / "cluster"
    command = [sys.executable, "-m", "lens_rome.cli", "trace-dataset", "--facts", str(facts),
               "--out", str(out), "--address", cluster, *ARGS]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store, killed = FactStore(out), None
    deadline = time.monotonic() + 600
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        if store.done():  # a fact is written: kill a worker that is tracing another
            workers = _tracing_workers()
            if workers:
                killed, done_then = workers[0], sorted(store.done())
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    printed, _ = run.communicate(timeout=600)
    assert run.returncode == 0, printed
    assert killed is not None, "no worker was tracing after the first fact: nothing killed"
    with capsys.disabled():  # what was killed when, for the log (pytest -s)
        print(f"\nkilled tracing worker pid {killed} (SIGKILL) when {len(done_then)} of 4 "
              f"facts were written (known_id {done_then})")
    assert len(done_then) < 4

    report = json.loads((out / "run.json").read_text())
    assert report["traced_this_run"] == 4 == len(store.done())
    distributed = store.read()
    one_row_each = distributed.groupby(COLUMNS).size()
    assert (one_row_each == 1).all(), "a fact's rows were written twice"

    local_out = tmp_path / "local"
    assert main(["trace-dataset", "--facts", str(facts), "--out", str(local_out), *ARGS]) == 0
    capsys.readouterr()
    local = FactStore(local_out).read()
    assert set(distributed["known_id"]) == set(local["known_id"])
    a = distributed.sort_values(COLUMNS).reset_index(drop=True)
    b = local.sort_values(COLUMNS).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[COLUMNS], b[COLUMNS])
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
