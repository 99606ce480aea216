"""SIGHUP on the gunicorn master re-reads kl_balancer.conf without dropping a request (docs/design.md, "Configuration").

gunicorn runs gunicorn.conf.py again in the master, forks new workers and lets the old ones finish
what they hold. A file that does not load is refused there, and the workers forked afterwards keep
the configuration the master already served (app.lifecycle.active).
"""

from __future__ import annotations

import os
import re
import signal
import time

from .ha_support import Load, failures
from .support import Spec, get, write_config

ALLOWED = (("GET", "/api/v.1.1/suppliers"), ("POST", "/api/{version}/lookup"))


def serve_both(inst) -> None:
    inst.server.expect_request("/api/v.1.1/suppliers").respond_with_json({"port": inst.port})
    inst.server.expect_request("/api/v2/lookup", method="POST").respond_with_json({"port": inst.port})


def wait_for_log(balancer, text: str, count: int = 1, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while balancer.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} times:\n{balancer.log()}"
        assert balancer.proc.poll() is None, f"the master died:\n{balancer.log()}"
        time.sleep(0.1)


def specs(a, b, a_on: bool, b_on: bool) -> list[Spec]:
    return [Spec("127.0.0.1", a.port, 9001, a_on), Spec("127.0.0.1", b.port, 9002, b_on)]


def test_hup_with_a_changed_configuration_under_load_fails_no_request(tmp_path, make_instance, start_balancer):
    a, b = make_instance(), make_instance()
    for inst in (a, b):
        serve_both(inst)
    config = write_config(tmp_path, specs(a, b, True, False), ALLOWED, workers=2)
    port = int(config.read_text().split('api_port="', 1)[1].split('"', 1)[0])
    balancer = start_balancer(config)
    master = balancer.proc.pid
    # New connection per request: a request never waits on an idle keep-alive connection of
    # an old worker that is about to close it (the client's problem, whatever the server).
    load = Load(balancer.port, threads=4, keep_alive=False, max_seconds=60).start()
    try:
        time.sleep(2)
        write_config(tmp_path, specs(a, b, False, True), ALLOWED, workers=2, api_port=port)
        os.kill(master, signal.SIGHUP)
        hup_at = time.monotonic()
        wait_for_log(balancer, "configuration reloaded from")
        wait_for_log(balancer, "Booting worker", count=4)
        # Old workers finish what they hold, then only b answers.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            recent = [o for o in load.outcomes if o.at > time.monotonic() - 1]
            if recent and {o.port for o in recent} == {b.port}:
                break
            time.sleep(0.2)
        time.sleep(2)
    finally:
        outcomes = load.stop()
    assert balancer.proc.poll() is None and balancer.proc.pid == master
    assert failures(outcomes) == []
    before = [o for o in outcomes if o.at < hup_at]
    assert len(before) >= 20 and {o.port for o in before} == {a.port}
    last = [o for o in outcomes if o.at > outcomes[-1].at - 1.5]
    assert len(last) >= 10 and {o.port for o in last} == {b.port}
    assert "Traceback" not in balancer.log()


def test_hup_with_a_broken_configuration_keeps_the_old_one_serving(tmp_path, make_instance, start_balancer):
    a, b = make_instance(), make_instance()
    for inst in (a, b):
        serve_both(inst)
    config = write_config(tmp_path, specs(a, b, True, False), ALLOWED, workers=2)
    port = int(config.read_text().split('api_port="', 1)[1].split('"', 1)[0])
    balancer = start_balancer(config)
    master = balancer.proc.pid
    load = Load(balancer.port, threads=2, keep_alive=False, max_seconds=60).start()
    try:
        time.sleep(1)
        # Enables b, but with a port out of range: the whole file is refused.
        good = write_config(tmp_path, specs(a, b, True, True), ALLOWED, workers=2, api_port=port).read_text()
        config.write_text(good.replace(f'api_port="{b.port}"', 'api_port="70000"'))
        line = next(i for i, text in enumerate(config.read_text().splitlines(), 1) if "70000" in text)
        os.kill(master, signal.SIGHUP)
        wait_for_log(
            balancer,
            "[ERROR] app.reload: reload refused, still serving the previous configuration: configuration error: "
            f"{config}:{line}: <Instance> attribute api_port='70000' is out of range; expected 1 to 65535",
        )
        # The master forks new workers anyway: they serve the configuration it kept.
        wait_for_log(balancer, "Booting worker", count=4)
        new_workers = set(re.findall(r"Booting worker with pid: (\d+)", balancer.log())[2:])
        time.sleep(3)
        views = [get(balancer.port, "/_balancer/status").json() for _ in range(6)]
        refused_until = time.monotonic()
        assert {str(v["worker_pid"]) for v in views} <= new_workers
        assert all([i["enabled"] for i in v["instances"]] == [True, False] for v in views)
        # A correct file is taken at the next SIGHUP.
        config.write_text(good)
        os.kill(master, signal.SIGHUP)
        wait_for_log(balancer, "configuration reloaded from")
        wait_for_log(balancer, "Booting worker", count=6)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(o.port == b.port for o in load.outcomes):
            time.sleep(0.2)
    finally:
        outcomes = load.stop()
    assert balancer.proc.poll() is None and balancer.proc.pid == master
    assert failures(outcomes) == []
    kept = [o for o in outcomes if o.at < refused_until]
    assert len(kept) >= 20 and {o.port for o in kept} == {a.port}
    assert any(o.port == b.port for o in outcomes), "the corrected configuration never took effect"
    log = balancer.log()
    assert "Traceback" not in log
    # No worker ever read the broken file, none failed to boot.
    assert "ctbalancer: configuration error" not in log
    assert "exited with code" not in log


def test_gunicorn_conf_run_again_on_a_broken_file_keeps_the_previous_settings(tmp_path):
    """What the master does on SIGHUP, without gunicorn: gunicorn.conf.py runs a second time."""
    import json
    import subprocess
    import sys

    from .support import ROOT

    good = write_config(tmp_path, [Spec("127.0.0.1", 8443, 9001)], ALLOWED, workers=3, api_port=9443).read_text()
    broken = good.replace('api_port="9443"', 'api_port="0"')
    fixed = good.replace('api_port="9443"', 'api_port="9444"')
    code = f"""
import json, pathlib, runpy, sys
import app.lifecycle
path = pathlib.Path({str(tmp_path / 'kl_balancer.conf')!r})
seen = []
for text in ({good!r}, {broken!r}, {fixed!r}):
    path.write_text(text)
    ns = runpy.run_path("gunicorn.conf.py")
    seen.append([ns["bind"], ns["workers"], app.lifecycle.active().balancer.api_port])
print(json.dumps(seen))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    env["BALANCER_CONFIG"] = str(tmp_path / "kl_balancer.conf")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[["127.0.0.1:9443"], 3, 9443], [["127.0.0.1:9443"], 3, 9443], [["127.0.0.1:9444"], 3, 9444]]
    errors = [line for line in done.stderr.splitlines() if "reload refused" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "[ERROR] app.reload: reload refused, still serving the previous configuration: configuration error: "
        f"{tmp_path / 'kl_balancer.conf'}:3: <Balancer> attribute api_port='0' is out of range; expected 1 to 65535"
    )
    assert "configuration reloaded from" in done.stderr
