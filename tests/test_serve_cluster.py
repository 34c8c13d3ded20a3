"""A two-node Ray cluster on this machine losing its worker node while the service decodes.

A head node and a worker node (``ray start --block``, one CPU each, so the two decoder replicas
land one per node) and ``idemrt serve --address`` with the bundled demo models. Six staggered
decodes run from client threads; the worker node's whole process session (its ``ray start``,
raylet, agents and the replica's worker process) is killed mid-load. Every client must get an
image or a problem+json answer (503 with Retry-After, or 504), never a dropped connection, and
the service must keep serving on the head's replica. Everything started here is stopped by PID.

Slow (about 1-2 minutes): ``.ci/run --slow`` or ``pytest -m slow tests/test_serve_cluster.py``.
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from local_ray import free_port

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # with 0 the second node is refused
       "RAY_AUTH_MODE": "disabled", "RAY_memory_monitor_refresh_ms": "0"}
STEPS = "20"  # a short demo decode: a few seconds on one CPU
HEIGHT, WIDTH = 48, 64


def _start(args, log: Path) -> subprocess.Popen:
    """A process in its own session (its PID is the session id its children inherit)."""
    return subprocess.Popen(args, env={**os.environ, **ENV}, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _kill_session(proc: subprocess.Popen) -> list:
    """SIGKILL every process of ``proc``'s session: a node's ``ray start``, raylet, agents, workers."""
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == proc.pid:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
        except OSError:  # gone already, or not ours
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    return killed


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:]
    pytest.fail(f"{text!r} not in {log.name} after {timeout:.0f} s (exit {proc.poll()}):\n{tail}")


def _decode(url: str, data: bytes, seed: int, timeout: float = 120) -> dict:
    """One decode over HTTP: what the client got ("image", "problem" or "error")."""
    t0 = time.monotonic()
    req = urllib.request.Request(f"{url}/v1/decode?seed={seed}&steps={STEPS}", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            body, headers = response.read(), response.headers
            return {"seed": seed, "outcome": "image", "status": response.status, "body": body,
                    "replica": headers.get("X-Idemrt-Replica"), "type": headers.get_content_type(),
                    "seconds": time.monotonic() - t0, "t0": t0}
    except urllib.error.HTTPError as err:
        return {"seed": seed, "outcome": "problem", "status": err.code, "body": err.read(),
                "retry_after": err.headers.get("Retry-After"), "type": err.headers.get_content_type(),
                "seconds": time.monotonic() - t0, "t0": t0}
    except Exception as exc:  # noqa: BLE001 - a dropped connection, a client timeout: what must not happen
        return {"seed": seed, "outcome": "error", "error": repr(exc), "seconds": time.monotonic() - t0, "t0": t0}


@pytest.fixture(scope="module")
def data():
    import idemrt
    from idemrt import demo_assets

    x = demo_assets.demo_image("chelsea")[..., :HEIGHT, :WIDTH]
    return idemrt.Encoder(demo_assets.load_demo_codec()).encode(x)


def test_losing_a_worker_node_mid_load(data):
    tmp = Path(tempfile.mkdtemp(prefix="idemrt-cluster-"))  # short: Ray's socket paths live under it
    gcs, http = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
              "--dashboard-agent-listen-port"]
    procs, passed = {}, False
    try:
        procs["head"] = _start([RAY, "start", "--head", "--port", str(gcs), *common, str(free_port()),
                                "--resources", '{"head": 1}', "--include-dashboard=false",
                                "--ray-client-server-port", str(free_port()), "--temp-dir", str(tmp / "ray")],
                               tmp / "head.log")
        _wait_for(tmp / "head.log", "Ray runtime started", procs["head"], 90)
        procs["worker"] = _start([RAY, "start", "--address", f"127.0.0.1:{gcs}", *common, str(free_port()),
                                  "--resources", '{"worker": 1}'], tmp / "worker.log")
        _wait_for(tmp / "worker.log", "Ray runtime started", procs["worker"], 90)
        # One CPU per replica and per node: serve.run returns once a replica runs on each node.
        procs["serve"] = _start([sys.executable, "-m", "idemrt.cli", "serve", "--demo", "--gpus-per-replica", "0",
                                 "--address", f"127.0.0.1:{gcs}", "--replicas", "2", "--proxy-location", "HeadOnly",
                                 "--steps", STEPS, "--port", str(http), "--timeout", "90"], tmp / "serve.log")
        _wait_for(tmp / "serve.log", "idemrt serve: http", procs["serve"], 180)

        # Both replicas answer (one per node).
        replicas = set()
        for _ in range(4):
            got = []
            threads = [threading.Thread(target=lambda s=s: got.append(_decode(url, data, s))) for s in range(4)]
            [t.start() for t in threads]
            [t.join(150) for t in threads]
            assert all(r["outcome"] == "image" for r in got), [(r["outcome"], r.get("status")) for r in got]
            replicas |= {r["replica"] for r in got}
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, replicas

        # Six staggered decodes; the worker node dies while they run.
        results, threads = [], []
        start = time.monotonic()
        killer = threading.Timer(1.6, lambda: results.append({"killed": _kill_session(procs["worker"]),
                                                              "at": time.monotonic() - start}))
        killer.start()
        for seed in range(10, 16):
            threads.append(threading.Thread(target=lambda s=seed: results.append(_decode(url, data, s))))
            threads[-1].start()
            time.sleep(0.5)
        [t.join(150) for t in threads]
        killer.join()
        kill = next(r for r in results if "killed" in r)
        answers = sorted((r for r in results if "seed" in r), key=lambda r: r["seed"])
        retried = sum(path.read_text(errors="replace").count("replica call failed")  # retry.py's warnings
                      for path in (tmp / "ray").glob("session_*/logs/**/*") if path.is_file())
        print(f"\nworker node killed at {kill['at']:.1f} s ({len(kill['killed'])} processes); the ingress "
              f"retried {retried} call(s) on a live replica")
        for r in answers:
            what = r.get("replica") or r.get("retry_after") or r.get("error")
            print(f"  seed {r['seed']}: sent at {r['t0'] - start:4.1f} s, {r['outcome']} {r.get('status', '')} "
                  f"({what}) after {r['seconds']:.1f} s")
        assert kill["killed"] and len(answers) == 6
        for r in answers:
            assert r["outcome"] in ("image", "problem"), r  # never a dropped connection
            if r["outcome"] == "image":
                assert r["status"] == 200 and r["type"] == "image/png"
                assert Image.open(io.BytesIO(r["body"])).size == (WIDTH, HEIGHT)
            else:
                assert r["type"] == "application/problem+json", r  # never a bare 5xx
                assert json.loads(r["body"])["status"] == r["status"]
                assert (r["status"] == 503 and r["retry_after"]) or r["status"] == 504, r

        # The service keeps serving, on the head node's replica.
        deadline, last = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            last = _decode(url, data, 99, timeout=60)
            if last["outcome"] == "image":
                break
            time.sleep(1)
        assert last["outcome"] == "image" and Image.open(io.BytesIO(last["body"])).size == (WIDTH, HEIGHT), last
        assert last["replica"] in replicas
        passed = True
    finally:
        for name in ("serve", "worker", "head"):  # by PID (their sessions), never `ray stop`
            if name in procs:
                _kill_session(procs[name])
        if passed:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}")
