"""Jobs on a Ray cluster with token authentication: the real `ray job submit` and the Job
Submission SDK against a local head (dashboard + job server) plus one worker raylet.

The cluster runs beside the test session's own Ray, in its own process sessions: teardown
stops exactly the processes it started (never `ray stop`, which would stop every Ray on the
machine). HOME points at an empty folder, so no ~/.ray/auth_token of this machine can
authenticate anything by accident: the token travels only where the test puts it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from tests.conftest import TINY_SETTINGS

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, token: str | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") or k in ("RAY_USAGE_STATS_ENABLED",)}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # the job's `python` is this venv's
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def _kill_session(proc: subprocess.Popen) -> None:
    """Stop `ray start --block` (it stops its node) and then anything left in its process session."""
    sid = proc.pid  # start_new_session: the session id is the leader's pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _http(url: str, token: str | None, data: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:  # not listening yet
        return 0, str(e)


def _wait(cond, timeout: float, what: str, logs: list[Path]):
    t0 = time.time()
    while time.time() - t0 < timeout:
        out = cond()
        if out:
            return out
        time.sleep(1.0)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A head (1 CPU, dashboard and job server on 127.0.0.1) and a worker raylet (1 CPU and a
    `worker_node` resource), both with RAY_AUTH_MODE=token."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.fail(f"no `ray` executable beside {sys.executable}")
    base = tmp_path_factory.mktemp("token_cluster")
    home = base / "home"
    home.mkdir()
    # Unix socket paths stay short; each raylet has its own temp dir, as separate machines
    # would: nodes sharing one unpack the same working_dir package into the same folder, and
    # the second unpacking deletes the folder the job's driver runs in
    temp_dirs = [Path(tempfile.mkdtemp(prefix="psray", dir="/tmp")) for _ in range(2)]
    token = secrets.token_hex(16)
    env = _env(home, token)
    gcs, dash = _free_port(), _free_port()
    procs: list[subprocess.Popen] = []
    logs = [base / "head.log", base / "worker.log"]
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]

    def own_ports() -> list[str]:
        # every raylet's agents on free ports: the defaults (dashboard agent 52365, ...) are
        # taken by the test session's own Ray, and a head whose agent cannot bind never
        # accepts a job ("No available agent to submit job")
        return [arg for opt in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                "--runtime-env-agent-port", "--metrics-export-port")
                for arg in (opt, str(_free_port()))]
    try:
        procs.append(subprocess.Popen(
            [RAY, "start", "--head", "--port", str(gcs), "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--ray-client-server-port", str(_free_port()), "--temp-dir", str(temp_dirs[0]), *own_ports(), *common],
            env=env, stdout=logs[0].open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=base))
        url = f"http://127.0.0.1:{dash}"
        _wait(lambda: _http(f"{url}/api/version", token)[0] == 200 if procs[0].poll() is None else True,
              120, "the head's dashboard", logs)
        assert procs[0].poll() is None, logs[0].read_text()[-3000:]
        procs.append(subprocess.Popen(
            [RAY, "start", "--address", f"127.0.0.1:{gcs}", "--resources", json.dumps({"worker_node": 1}),
             "--temp-dir", str(temp_dirs[1]), *own_ports(), *common],
            env=env, stdout=logs[1].open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=base))

        def two_nodes():
            r = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{gcs}"], env=env, capture_output=True,
                               text=True, timeout=60)
            return r.returncode == 0 and "worker_node" in r.stdout and r.stdout.count(" node_") >= 2

        _wait(two_nodes, 120, "the worker raylet to join", logs)

        # the job server answers before the head's agent has registered ("No available agent
        # to submit job", HTTP 500 for a while): a first job, retried until accepted, waits for it
        def accepts_jobs():
            code, body = _http(f"{url}/api/jobs/", token, data=json.dumps({"entrypoint": "echo ready"}).encode())
            return code == 200

        _wait(accepts_jobs, 180, "the job server to accept a job", logs)
        yield SimpleNamespace(url=url, gcs=f"127.0.0.1:{gcs}", token=token, env=env, home=home, base=base,
                              logs=logs)
    finally:
        for p in reversed(procs):
            _kill_session(p)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_run(token_cluster):
    """A tiny initialised run (10% labeled) the submitted jobs work on."""
    from poolscout.engine.core.config import load_config
    from poolscout.engine.core.run import RunDir
    from poolscout.engine.data.pool import init_run
    from poolscout.engine.data.synthetic import generate

    root = token_cluster.base
    pool = generate(root / "pool", n_images=24, size=64, seed=5)
    cfg = load_config([], [*TINY_SETTINGS, "train.torch_threads=1", "score.torch_threads=1", "score.views=[orig]",
                           "score.batch_size=4", "score.num_cpus=0.5", "train.backend=in_process"])
    run = RunDir(root / "run")
    init_run(run, images=pool["images"], annotations=pool["annotations"], seed_fraction=0.25, cfg=cfg,
             progress=False)
    return run


def test_a_submission_without_the_token_is_refused(token_cluster):
    # the job REST API without a bearer token, and with a wrong one
    for tok in (None, "0" * 32):
        code, body = _http(f"{token_cluster.url}/api/jobs/", tok,
                           data=json.dumps({"entrypoint": "echo should-not-run"}).encode())
        assert code in (401, 403), (tok, code, body[:300])
    # the CLI with no token anywhere (HOME is empty): refused, nothing submitted
    r = subprocess.run([RAY, "job", "submit", "--address", token_cluster.url, "--no-wait", "--", "echo", "nope"],
                       env=_env(token_cluster.home, None), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "auth" in (r.stdout + r.stderr).lower()
    code, body = _http(f"{token_cluster.url}/api/jobs/", token_cluster.token)
    assert code == 200
    assert "should-not-run" not in body and "nope" not in body


def test_ray_job_submit_runs_a_cycle_on_the_cluster(token_cluster, cluster_run):
    """`ray job submit --working-dir . -- python -m poolscout.jobs cycle RUN`: the job trains,
    scores the pool with Ray Data on the two-node cluster, selects and exports; its logs show
    poolscout's console lines."""
    run = cluster_run
    r = subprocess.run(
        [RAY, "job", "submit", "--address", token_cluster.url, "--working-dir", ".",
         "--submission-id", "poolscout-cycle-0", "--",
         "python", "-m", "poolscout.jobs", "cycle", str(run.root), "--strategy", "entropy", "--budget", "4",
         "--format", "coco"],
        env=token_cluster.env, capture_output=True, text=True, timeout=900, cwd=REPO)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-2000:]
    assert "[cycle 0]" in out  # poolscout's own console lines, followed through the job's logs
    # the run directory holds the cycle's outputs, the whole pool scored exactly once
    from poolscout.engine.core import io

    scores = io.read_table(run.scores_path(0)).column("image_id").to_pylist()
    ledger = io.read_table(run.ledger).to_pydict()
    unlabeled = {i for i, st in zip(ledger["image_id"], ledger["state"]) if st not in ("labeled", "test")}
    assert len(scores) == len(set(scores)) and set(scores) == unlabeled and len(unlabeled) >= 12
    sel = io.read_table(run.selection_path(0)).column("image_id").to_pylist()
    assert len(sel) == len(set(sel)) == 4 and set(sel) <= unlabeled
    assert json.loads((run.cycle_dir(0) / "score.json").read_text())["executor"] == "ray"
    assert (run.cycle_dir(0) / "export" / "coco.json").is_file()
    # `ray job logs` replays the same lines after the fact
    logs = subprocess.run([RAY, "job", "logs", "--address", token_cluster.url, "poolscout-cycle-0"],
                          env=token_cluster.env, capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and "[cycle 0]" in logs.stdout


def test_job_submission_sdk_follows_a_job_to_its_end(token_cluster, cluster_run):
    """The Job Submission SDK (JobSubmissionClient) submits `python -m jobs.cli status RUN --json`
    from the uploaded working dir, tails its logs and reads the final status."""
    script = r"""
import asyncio, json, sys
from ray.job_submission import JobSubmissionClient, JobStatus
url, repo, run = sys.argv[1:4]
client = JobSubmissionClient(url)
jid = client.submit_job(entrypoint=f"python -m jobs.cli status {run} --json", runtime_env={"working_dir": repo})
async def tail():
    lines = []
    async for chunk in client.tail_job_logs(jid):
        lines.append(chunk)
    return "".join(lines)
tailed = asyncio.run(tail())
info = client.get_job_info(jid)
print("RESULT:" + json.dumps({"status": str(info.status), "tailed": tailed, "logs": client.get_job_logs(jid)}))
"""
    r = subprocess.run([sys.executable, "-c", script, token_cluster.url, str(REPO), str(cluster_run.root)],
                       env=token_cluster.env, capture_output=True, text=True, timeout=600, cwd=token_cluster.base)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT:")), None)
    assert line is not None, (r.stdout + r.stderr)[-4000:]
    res = json.loads(line[len("RESULT:"):])
    assert res["status"].endswith("SUCCEEDED"), res
    body = res["logs"][res["logs"].index("{"):res["logs"].rindex("}") + 1]
    status = json.loads(body)
    assert Path(status["run"]).resolve() == cluster_run.root.resolve(), status
    assert status["ledger"].get("labeled", 0) >= 6, status  # the seed (25% of 24), and any import since
    assert res["tailed"].strip() == res["logs"].strip()
