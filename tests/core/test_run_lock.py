"""One job per output folder: a second job refuses while the first runs; a dead job's lock is taken over."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from robust_jobs import job_dir, start_killed, tiny_job, write_job  # noqa: F401 (job_dir: fixture)

from loraforge.cli import main as cli
from loraforge.core import run_lock
from loraforge.core.checkpoint import incomplete_reason
from loraforge.core.files import check_adapter_folder


def test_second_job_on_a_folder_refuses_and_the_first_finishes_whole(job_dir, tmp_path, capsys):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_job(job_dir, "delta_lora_folded", out, max_steps=4))
    first = start_killed("pause", 2, job)  # sleeps 10 s after checkpoint-2, holding the lock
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint-2").is_dir() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (out / "checkpoint-2").is_dir()
        assert f"pid {first.pid} " in (out / run_lock.LOCK_NAME).read_text()
        assert cli(["train", job, "--resume"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and f"is in use by another job (pid {first.pid} " in err[0], err
    finally:
        _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    check_adapter_folder(str(out))
    assert [incomplete_reason(str(out / f"checkpoint-{n}")) for n in (2, 4)] == [None, None]
    assert not (out / run_lock.LOCK_NAME).exists()  # released at the end


def test_a_dead_jobs_lock_is_taken_over_with_a_notice(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / run_lock.LOCK_NAME).write_text(f"pid {pid} on somehost\n")
    notices = []
    with run_lock.hold(str(tmp_path), announce=notices.append):
        assert (tmp_path / run_lock.LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
        with pytest.raises(run_lock.OutputFolderBusy, match="in use by another job"):  # held: a second holder refuses
            with run_lock.hold(str(tmp_path)):
                pass
    assert len(notices) == 1 and f"no longer running (pid {pid} on somehost)" in notices[0]
