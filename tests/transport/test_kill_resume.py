"""Both parties as real processes, SIGKILLed mid-run and restarted with --resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from splitfed.config import parse_config
from splitfed.run import train
from tiny import run_config, save_tiny_pretrained, write_topic_csv

STEPS, EVERY = 240, 40
SPLITFED = [sys.executable, "-m", "splitfed.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*SPLITFED, *args], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.mark.timeout(240)
def test_sigkill_both_sides_and_resume(tmp_path: Path) -> None:
    save_tiny_pretrained(tmp_path / "model")
    write_topic_csv(tmp_path / "data.csv")
    raw = run_config(tmp_path, "run", train={"steps": STEPS, "checkpoint_every": EVERY, "lr": 1e-3})
    raw["model"]["num_labels"] = 3
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    straight_raw = {**raw, "output_dir": str(tmp_path / "straight")}
    straight = train(parse_config(straight_raw), progress=False, log=lambda s: None)

    port = _free_port()
    log = tmp_path / "log.txt"
    serve_args = ["serve", str(config), "--port", str(port)]
    join_args = ["join", str(config), "--server", f"127.0.0.1:{port}", "--no-progress"]
    server = _start(serve_args, log)
    _wait_port(port, server)
    client = _start(join_args, log)
    progress = tmp_path / "run" / "checkpoint" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert client.poll() is None, log.read_text()[-2000:]
        if progress.is_file() and json.loads(progress.read_text())["step"] >= 2 * EVERY:
            break
        time.sleep(0.05)
    for proc in (client, server):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = json.loads(progress.read_text())["step"]
    assert killed_at < STEPS

    server = _start([*serve_args, "--resume"], log)
    _wait_port(port, server)
    try:
        client = _start([*join_args, "--resume"], log)
        assert client.wait(timeout=180) == 0, log.read_text()[-3000:]
        server.send_signal(signal.SIGTERM)  # as a service manager stops it: saves its adapters
        assert server.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGKILL)
            server.wait()
    final = load_file(
        str(tmp_path / "run" / "model_party_server" / "final" / "model_party" / "adapter.safetensors")
    )
    trained = load_file(str(tmp_path / "straight" / "model_party" / "adapter.safetensors"))
    assert set(final) == set(trained)
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, trained[name], atol=1e-5, rtol=1e-4)
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    text = " ".join(log.read_text().split())
    assert "model party resumed from" in text and f"at step {killed_at}" in text
    losses = [h["loss"] for h in resumed["history"]]
    assert losses == pytest.approx([h["loss"] for h in straight.history], abs=1e-5)
    assert resumed["metrics_after"] == pytest.approx(straight.metrics_after, abs=1e-5)
