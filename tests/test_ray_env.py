"""The embedded Ray: loopback only, and what a killed driver leaves behind is cleaned up."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time

import pytest

psutil = pytest.importorskip("psutil")


def _listening(procs) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((p.pid, p.name(), c.laddr.ip))
        except psutil.Error:
            pass
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if getattr(addr, "ipv4_mapped", None) is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.mark.ray
def test_embedded_ray_listens_on_loopback_only(ray_session):
    import ray

    @ray.remote
    def pid():
        return os.getpid()

    ray.get([pid.remote() for _ in range(2)])  # workers up
    me = psutil.Process()
    socks = _listening([me, *me.children(recursive=True)])
    names = {name for _, name, _ in socks}
    assert any("gcs" in n for n in names) and any("raylet" in n for n in names), socks
    wide = [s for s in socks if not _is_loopback(s[2])]
    assert not wide, f"listening beyond 127.0.0.1: {wide}"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_loopback_check_itself():
    assert _is_loopback("127.0.0.1") and _is_loopback("::ffff:127.0.0.1") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("::") and not _is_loopback("192.0.2.2")


def test_reap_orphans_leaves_live_drivers_and_reused_pids_alone(tmp_path):
    import json

    from poolscout.jobs.ray_env import reap_orphans

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = psutil.Process()
        c = psutil.Process(child.pid)
        # a live driver: its processes stay
        (tmp_path / "1.json").write_text(json.dumps({"driver": me.pid, "created": me.create_time(),
                                                     "procs": [{"pid": c.pid, "created": c.create_time()}]}))
        # a dead driver whose recorded pid now belongs to another process (start time differs)
        (tmp_path / "2.json").write_text(json.dumps({"driver": 2 ** 22 + 7, "created": 1.0,
                                                     "procs": [{"pid": c.pid, "created": c.create_time() - 100}]}))
        (tmp_path / "3.json").write_text("not json")
        assert reap_orphans(tmp_path) == 0
        assert child.poll() is None
        assert (tmp_path / "1.json").exists() and not (tmp_path / "2.json").exists()
        assert not (tmp_path / "3.json").exists()
        # the same record with the right start time: stopped
        (tmp_path / "4.json").write_text(json.dumps({"driver": 2 ** 22 + 7, "created": 1.0,
                                                     "procs": [{"pid": c.pid, "created": c.create_time()}]}))
        assert reap_orphans(tmp_path) == 1
        assert child.wait(timeout=10) is not None
    finally:
        if child.poll() is None:
            child.kill()


@pytest.mark.ray
def test_processes_of_a_killed_driver_are_stopped_by_the_next_start(tmp_path):
    from poolscout.jobs.ray_env import reap_orphans

    env = {**os.environ, "POOLSCOUT_RAY_REGISTRY": str(tmp_path)}
    code = ("import time\nfrom poolscout.jobs.ray_env import connect\nconnect(num_cpus=1)\n"
            "print('up', flush=True)\ntime.sleep(600)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert driver.stdout.readline().strip() == "up"
        records = list(tmp_path.glob("*.json"))
        assert [r.name for r in records] == [f"{driver.pid}.json"]
        import json

        procs = json.loads(records[0].read_text())["procs"]
        assert len(procs) >= 3  # gcs, raylet, agents, ...
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)

    def alive():
        out = []
        for p in procs:
            try:
                if psutil.Process(p["pid"]).create_time() == p["created"]:
                    out.append(p["pid"])
            except psutil.Error:
                pass
        return out

    time.sleep(1.0)
    left = alive()
    assert left, "nothing outlived the killed driver: this test no longer checks anything"
    assert reap_orphans(tmp_path) >= 1
    deadline = time.time() + 15
    while alive() and time.time() < deadline:
        time.sleep(0.2)
    assert alive() == []
    assert list(tmp_path.glob("*.json")) == []
