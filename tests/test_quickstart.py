"""docs/quickstart.md, run: its marked bash blocks, in order, in one shell, in a scratch copy of
the clone's config, against the built-in simulator on free loopback ports, bounded in time."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "docs" / "quickstart.md"
MARKED_BLOCK = re.compile(r"<!-- quickstart -->\n```bash\n(.*?)```", re.DOTALL)
PORTS = ("18000", "9787", "8787")  # simulator, admin, public: replaced by free ports
RUN_WITHIN_S = 120


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def quickstart_script() -> str:
    """The marked blocks joined into one script that stops at the first failing command."""
    blocks = MARKED_BLOCK.findall(QUICKSTART.read_text(encoding="utf-8"))
    assert len(blocks) >= 5, "docs/quickstart.md lost its <!-- quickstart --> bash blocks"
    return "set -euo pipefail\n" + "\n".join(blocks)


def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    """Every marked command succeeds and shows what the text says: the demo's check, a key, a
    ready proxy, a priced SDK call, the report, the budgets the spend page reads, the metrics."""
    script = quickstart_script()
    config = (ROOT / "config" / "example.yaml").read_text(encoding="utf-8")
    for port in PORTS:
        free = _free_port()
        script = script.replace(port, free)
        config = config.replace(f"port: {port}", f"port: {free}")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "example.yaml").write_text(config, encoding="utf-8")
    (tmp_path / "config" / "prices.yaml").write_bytes((ROOT / "config" / "prices.yaml").read_bytes())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TOGETHER_METER_ADMIN_TOKEN", None)
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=RUN_WITHIN_S)
    finally:
        if proc.poll() is None or proc.returncode != 0:
            _stop_session(proc.pid)  # the simulator and the proxy it left in the background
            proc.wait(timeout=10)
    assert proc.returncode == 0, out
    assert "tokens match the simulator's billing: yes" in out
    assert '"ready":true' in out and "cost USD: 0.0000" in out
    assert "by model" in out and "meta-llama/Llama-3.3-70B-Instruct-Turbo" in out
    assert '"tenants":{"acme"' in out and re.search(r'together_meter_cost_usd_total\{.*tenant="acme"', out)
    assert (tmp_path / "config" / "keys.yaml").exists() and (tmp_path / "data" / "together-meter.db").exists()
    assert not (tmp_path / ".demo").exists()  # the demo left nothing in the working directory


def _stop_session(pid: int) -> None:
    """SIGKILL to the process group this test started (its session's leader is `pid`)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def test_the_readme_links_the_quickstart_near_the_top() -> None:
    """A newcomer finds the quickstart in the README's first lines."""
    top = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:15])
    assert "(docs/quickstart.md)" in top
