"""`ray job submit` end to end against a real Ray cluster with token authentication on.

The module starts its own head node (`ray start --head --block`) on 127.0.0.1 with its own
temp dir, free ports and a token file, and submits the jobs in jobs/ exactly as
cluster/README.md tells users to. It does not use the session's `ray_session` instance,
and it never runs `ray stop` (which would stop every Ray on this machine): teardown ends
the head's process group and any process that inherited this cluster's marker variable.
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
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from effray.cluster import runtime_env
from effray.data.prepare import load_meta

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ENV = "cluster/runtime_env.yaml"
BIN = Path(sys.executable).parent  # the venv's python and ray: a job's `python` is this one
MARKER = "EFFRAY_TEST_CLUSTER"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_env(**extra: str) -> dict[str, str]:
    """The test process's environment minus anything that points Ray elsewhere: a local
    Ray started earlier in this process (the session's, a multi-node test's) leaves
    ``RAY_API_SERVER_ADDRESS`` naming its own dashboard, and a job client or head given it
    talks to that instance (auth fails: "Invalid authentication token")."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "RAY_API_SERVER_ADDRESS"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


@dataclass
class Cluster:
    address: str  # the dashboard / job API, http://127.0.0.1:PORT
    token_path: Path
    temp_dir: Path
    marker: str
    head: subprocess.Popen

    def env(self, **extra: str) -> dict[str, str]:
        """A submitter's shell, as the guide sets it up: token mode on, token from a file."""
        return _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), **extra)

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], cwd=ROOT, env=env or self.env(), capture_output=True, text=True, timeout=timeout
        )

    def submit(
        self, *entrypoint: str, job_id: str, wait: bool = True, runtime_env_args: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess:
        renv = runtime_env_args or ("--runtime-env", RUNTIME_ENV)
        return self.ray(
            "job",
            "submit",
            "--address",
            self.address,
            "--submission-id",
            job_id,
            *renv,
            "--working-dir",
            ".",
            *(() if wait else ("--no-wait",)),
            "--",
            *entrypoint,
            timeout=300,
        )

    def status(self, job_id: str) -> str:
        """PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED, from the job REST API (the CLI's
        `ray job status` prints prose)."""
        req = urllib.request.Request(
            f"{self.address}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {self.token_path.read_text()}"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["status"]

    def logs(self, job_id: str) -> str:
        return self.ray("job", "logs", "--address", self.address, job_id).stdout

    def wait_for(self, job_id: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.status(job_id)) in ("PENDING", "RUNNING") and time.monotonic() < deadline:
            time.sleep(1)
        return state


def _http(url: str, token: str | None = None, data: bytes | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except urllib.error.URLError:  # not listening yet
        return 0


def _cluster_pids(marker: str) -> list[int]:
    """Processes of this cluster only: those whose environment carries its marker."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on, from /proc."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                addr, port = cols[1].split(":")
                found.add((addr, int(port, 16)))
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1 in /proc/net/tcp and tcp6


@pytest.fixture(scope="module")
def cluster():
    temp_dir = Path(tempfile.mkdtemp(prefix="effray-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    marker = uuid.uuid4().hex
    port, dash = _free_port(), _free_port()
    env = _client_env(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        # Ray swaps 127.0.0.1 for the host's routable IP unless this is 0; with it, GCS, raylet
        # and object manager stay on loopback too (and no other node can join, as wanted here).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        **{MARKER: marker},
    )
    log = open(temp_dir / "head.log", "w")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        cwd=temp_dir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_plain_signals,
    )
    c = Cluster(f"http://127.0.0.1:{dash}", token_path, temp_dir, marker, head)
    try:
        deadline = time.monotonic() + 90
        while _http(f"{c.address}/api/version", token_path.read_text()) != 200:
            assert head.poll() is None, (temp_dir / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Ray head did not come up in 90 s"
            time.sleep(0.5)
        yield c
    finally:
        _teardown(c)
        log.close()


def _plain_signals() -> None:
    """Start the head as a shell would: nothing blocked or ignored. Signal masks and
    ignored signals survive exec, and by the time the whole suite is collected this
    process has imported libraries that change them; inherited by the job drivers, that
    made `ray job stop`'s SIGINT never arrive (the job ran to the end)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _teardown(c: Cluster) -> None:
    """Stop this cluster and nothing else, whatever state the tests left it in."""
    if c.head.poll() is None:
        c.head.send_signal(signal.SIGTERM)
        try:
            c.head.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(c.head.pid, signal.SIGKILL)  # the head's helpers (start_new_session made it a group)
    except ProcessLookupError:
        pass
    for _ in range(10):  # job drivers run in sessions of their own; the marker finds them
        pids = _cluster_pids(c.marker)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    c.head.wait(10)
    shutil.rmtree(c.temp_dir, ignore_errors=True)


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_cluster_listens_on_loopback_only_and_requires_the_token(cluster):
    token = cluster.token_path.read_text()
    # the guide's way for a submitter to get the token: `ray get-auth-token` on a machine that has it
    got = cluster.ray("get-auth-token")
    assert got.returncode == 0 and got.stdout.strip() == token
    sockets = _listening(_cluster_pids(cluster.marker))
    assert {addr for addr, _ in sockets} <= LOOPBACK, sockets  # GCS, raylet, dashboard, agents
    assert int(cluster.address.rsplit(":", 1)[1]) in {port for _, port in sockets}
    assert _http(f"{cluster.address}/api/jobs/") == 401
    assert _http(f"{cluster.address}/api/jobs/", token="0" * 64) == 403
    assert _http(f"{cluster.address}/api/jobs/", token=token) == 200
    body = json.dumps({"entrypoint": "echo pwned", "submission_id": "no-token-raw"}).encode()
    assert _http(f"{cluster.address}/api/jobs/", data=body) == 401


def test_submission_without_the_token_is_refused(cluster):
    no_token = _client_env()  # RAY_AUTH_MODE unset: the client sends no token
    refused = cluster.ray(
        "job",
        "submit",
        "--address",
        cluster.address,
        "--submission-id",
        "no-token",
        "--",
        "echo",
        "pwned",
        env=no_token,
    )
    assert refused.returncode != 0
    assert "Unauthorized: Missing authentication token" in refused.stderr
    wrong = cluster.ray(
        "job",
        "submit",
        "--address",
        cluster.address,
        "--submission-id",
        "wrong-token",
        "--",
        "echo",
        "pwned",
        env=_client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="f" * 64),
    )
    assert wrong.returncode != 0 and "Forbidden: Invalid authentication token" in wrong.stderr
    listed = cluster.ray("job", "list", "--address", cluster.address)
    assert listed.returncode == 0 and "no-token" not in listed.stdout and "wrong-token" not in listed.stdout


@pytest.fixture(scope="module")
def job_prepared(cluster, cifar_parquet, tmp_path_factory):
    """600 real CIFAR-10 rows prepared by a `jobs/prepare_data.py` job (the train job below
    trains on them): its result and output dir."""
    out = tmp_path_factory.mktemp("job-data") / "tiny-cifar"
    done = cluster.submit(
        "python",
        "jobs/prepare_data.py",
        "--source",
        f"parquet:{cifar_parquet}",
        "--limit",
        "600",
        "--out",
        str(out),
        job_id="prepare-ok",
    )
    return done, out


def test_prepare_job_succeeds_with_the_shipped_runtime_env(cluster, job_prepared, cifar_parquet):
    done, out = job_prepared
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert cluster.status("prepare-ok") == "SUCCEEDED"
    result = _last_json(cluster.logs("prepare-ok"))
    counts = {"train": 480, "val": 60, "test": 60}  # the default --test-fraction 0.1 carved out of the 600
    assert result["out"] == str(out) and result["counts"] == counts
    meta = load_meta(out)
    assert meta["counts"] == counts and meta["source"] == f"parquet:{cifar_parquet}"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test", "train", "val"]


def test_secret_from_the_submitting_shell_reaches_the_job(cluster):
    key = secrets.token_hex(8)
    renv = json.dumps(runtime_env(ROOT / RUNTIME_ENV, {"WANDB_API_KEY": key}))
    probe = "import os, sys; print('key ok' if os.environ['WANDB_API_KEY'] == sys.argv[1] else 'key wrong')"
    done = cluster.submit(
        "python", "-c", probe, key, job_id="secret-env", runtime_env_args=("--runtime-env-json", renv)
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "key ok" in cluster.logs("secret-env")


def test_relative_output_path_fails_the_job_before_anything_is_written(cluster):
    """Bad input in a job: the job FAILED, with effray's one-line error in its logs. (Each
    flag's own check is tested in-process, e.g. test_prepare.py's --val-fraction.)"""
    done = cluster.submit(
        "python", "jobs/prepare_data.py", "--source", "synthetic:50", "--out", "rel/data", job_id="relative-out"
    )
    assert done.returncode != 0
    assert cluster.wait_for("relative-out") == "FAILED"
    errors = [line for line in cluster.logs("relative-out").splitlines() if line.startswith("effray: error:")]
    assert len(errors) == 1 and errors[0].startswith("effray: error: --out rel/data is a relative path"), errors
    assert "/mnt/effray/rel/data" in errors[0]


def test_stopped_job_is_stopped_and_leaves_no_output(cluster, cifar_parquet, tmp_path):
    # 200k rows (the real file four times): warm workers decode the 50k alone in ~2 s, less
    # than a stop takes to land, and the job would rename its output first
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(cifar_parquet)
    source = tmp_path / "cifar10x4.parquet"
    pq.write_table(pa.concat_tables([table] * 4), source)
    out = tmp_path / "cifar10"
    started = cluster.submit(
        "python",
        "jobs/prepare_data.py",
        "--source",
        f"parquet:{source}",
        "--out",
        str(out),
        job_id="long-prepare",
        wait=False,
    )
    assert started.returncode == 0, started.stderr[-3000:]
    # stop it mid-write, once its temporary directory exists: poll the file system and stop
    # through the REST API, because a `ray job` CLI call costs seconds on a loaded machine
    # and the whole decode-and-write takes only a few
    deadline = time.monotonic() + 90
    while not list(tmp_path.glob(".cifar10.tmp-*")):
        assert time.monotonic() < deadline, (
            "the prepare job never started writing: " + cluster.logs("long-prepare")[-3000:]
        )
        time.sleep(0.02)
    token = cluster.token_path.read_text()
    assert _http(f"{cluster.address}/api/jobs/long-prepare/stop", token=token, data=b"{}") == 200
    assert cluster.wait_for("long-prepare", timeout=60) == "STOPPED"
    # the final name appears only by an atomic rename at the very end
    assert not out.exists(), cluster.logs("long-prepare")[-3000:]
    assert "effray: interrupted" in cluster.logs("long-prepare")  # SIGINT (runtime_env.yaml), not SIGKILL
    time.sleep(2)  # tasks the driver had in flight are cancelled with it
    leftovers = [p.name for p in tmp_path.iterdir() if p != source]
    assert all(name.startswith(".cifar10.tmp-") for name in leftovers), leftovers


@pytest.mark.slow
def test_train_job_writes_a_checkpoint_and_prints_its_metrics(cluster, job_prepared, tmp_path):
    from effray.train.checkpoint import load_checkpoint

    (prepared, data), storage = job_prepared, tmp_path / "runs"
    assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
    done = cluster.submit(
        "python",
        "jobs/train.py",
        "--data",
        str(data),
        "--model",
        "convnet",
        "--epochs",
        "1",
        "--width",
        "0.25",
        "--workers",
        "1",
        "--storage",
        str(storage),
        "--name",
        "tiny",
        "--no-wandb",
        job_id="train-tiny",
    )
    logs = cluster.logs("train-tiny")
    assert done.returncode == 0 and cluster.status("train-tiny") == "SUCCEEDED", logs[-3000:]
    result = _last_json(logs)
    assert result["run"] == "tiny" and Path(result["run_dir"]) == storage / "tiny"
    assert result["epoch"] == 1 and 0 < result["train_loss"] < 10 and 0 <= result["val_accuracy"] <= 1
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.parent == storage / "tiny" and (checkpoint / "model.pt").is_file()
    model, payload = load_checkpoint(checkpoint)  # weights_only: the saved dict, nothing executable
    assert sum(p.numel() for p in model.parameters()) > 0 and payload["format"]


def test_state_api_in_workers_reaches_this_instance_while_another_ray_runs(ray_session, cluster):
    """Ray Train V2's PlacementGroupCleaner asks the state API from a worker whether the
    Train controller lives. With two Ray instances on the machine (the session's and this
    module's head), address auto-detection fails or picks the wrong one; effray's
    ``init_ray`` pins every worker to its own instance's API server."""
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def ping(self) -> int:
            return 1

    @ray.remote(num_cpus=0)
    def actor_state(actor_id: str) -> tuple[str | None, str | None]:
        from ray.util.state import get_actor

        found = get_actor(actor_id, timeout=30)
        return os.environ.get("RAY_API_SERVER_ADDRESS"), found.state if found else None

    assert cluster.head.poll() is None  # the other instance is up
    probe = Probe.remote()
    ray.get(probe.ping.remote())
    address, state = ray.get(actor_state.remote(probe._actor_id.hex()), timeout=120)
    assert address and address != cluster.address
    assert state == "ALIVE"
    ray.kill(probe)
