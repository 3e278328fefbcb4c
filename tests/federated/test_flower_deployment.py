"""A real Flower deployment on loopback: one SuperLink, two SuperNodes, `flwr run` of examples/flower
with CKKS for 2 rounds; the clients' final model equals the in-process simulation's within 1e-6."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_flower_app import max_relative_error, write_run

from splitfed.config import load_config
from splitfed.federated.simulation import fedtrain
from tiny import save_tiny_pretrained, write_topic_csv

pytestmark = pytest.mark.integration

APP = Path(__file__).resolve().parents[2] / "examples" / "flower"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on {port} after {timeout:g} s:\n{log.read_text()[-3000:]}")


@pytest.fixture()
def federation(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], list[Path]]]:
    """A SuperLink and two SuperNodes (partitions 0 and 1) on loopback, torn down afterwards."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        logs.append(log)
        return proc, log

    try:
        link, log = start("superlink", "flower-superlink", "--insecure", "--port", str(port))
        _wait_for_port(port, link, log)
        outs = []
        for i in range(2):
            out = tmp_path / f"node{i}"
            outs.append(out)
            node_port = _free_port()
            node, node_log = start(
                f"supernode{i}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(node_port),
                "--node-config",
                f'partition-id={i} output-dir="{out}"',
            )
            _wait_for_port(node_port, node, node_log)
        yield tmp_path, env, outs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_two_supernodes_run_ckks_rounds_equal_to_the_simulation(
    federation: tuple[Path, dict[str, str], list[Path]],
) -> None:
    root, env, outs = federation
    save_tiny_pretrained(root / "model")
    write_topic_csv(root / "data.csv")
    sim = fedtrain(load_config(write_run(root, "sim")), progress=False, log=lambda _: None)
    run = write_run(root, "fl")
    done = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            str(APP),
            "loop",
            "--stream",
            "--run-config",
            f'config="{run}" timeout=300',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    shown = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, shown
    assert "round 2/2" in done.stdout and "the server holds no secret key" in done.stdout, shown
    expected = load_file(str(sim.output_dir / "global" / "adapter.safetensors"))
    for out in outs:
        got = load_file(str(out / "global" / "adapter.safetensors"))
        assert max_relative_error(expected, got) < 1e-6
    summary = json.loads((root / "fl" / "results.json").read_text())
    assert summary["runtime"] == "flower" and [h["clients"] for h in summary["history"]] == [2, 2]
