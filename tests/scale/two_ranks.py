"""What the two-process tests share: a free port, one sharded launch beside one single-process reference
run of the same worker, and the results the workers write (`<name>.<tag>.pt`, or `.error` with the
traceback)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_beside(launch: list[str], single: list[str], log: Path, timeout: int) -> None:
    """Run `launch` (the 2-rank job, output to `log`) and `single` (the reference) at the same time."""
    with open(log, "w") as f:
        sharded = subprocess.Popen(launch, env=ENV, stdout=f, stderr=subprocess.STDOUT)
        reference = subprocess.run(single, env=ENV, capture_output=True, text=True)
        sharded.wait(timeout=timeout)
    assert sharded.returncode == 0, log.read_text()[-4000:]
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-4000:]


def load_result(out: Path, name: str, tag: str) -> dict:
    error = out / f"{name}.{tag}.error"
    if error.exists():
        pytest.fail(f"{name} failed on {tag}:\n{error.read_text()}")
    return torch.load(out / f"{name}.{tag}.pt", weights_only=False)


def exit_without_finalising(code: int) -> None:
    """How a worker leaves once every result is written and closed: without interpreter finalisation, where
    gloo's worker threads may still free tensors that hold Python references and abort the process
    ("terminate called without an active exception", SIGABRT; seen once in 4 CI runs here;
    pytorch/pytorch#179291)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
