"""`clsa serve` and `clsa client` as a user runs them: separate processes over a socket."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from services.bench.serve import wait_serving
from services.transfer.local_redis import free_port

CLSA = str(Path(sys.executable).parent / "clsa")


def test_serve_then_client_matches_generate_and_stops_on_sigterm() -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = subprocess.Popen([CLSA, "serve", "--model", "clsa-tiny", "--port", str(port), "--metrics-port",
                             str(free_port()), "--backend", "local"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(address, proc)
        args = ["--prompt", "hello", "--max-tokens", "10", "--temperature", "0.7", "--seed", "5", "--ignore-eos"]
        want = json.loads(subprocess.run([CLSA, "generate", "--model", "clsa-tiny", "--json", *args],
                                         capture_output=True, text=True, timeout=120).stdout)["text"]
        for extra in ([], ["--stream"]):
            got = subprocess.run([CLSA, "client", "--address", address, *args, *extra], capture_output=True,
                                 text=True, timeout=120)
            assert got.returncode == 0, got.stderr
            assert got.stdout == want + "\n" and "10 tokens, FINISH_REASON_LENGTH" in got.stderr
        bad = subprocess.run([CLSA, "client", "--address", address, "--prompt", "x", "--top-p", "3"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.top_p" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert "shutting down" in proc.stderr.read()
