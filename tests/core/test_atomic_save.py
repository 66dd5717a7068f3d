"""A kill inside a save leaves no folder that resume or any command takes for complete."""
from __future__ import annotations

import signal

from robust_jobs import job_dir, run_killed, tiny_job, write_job  # noqa: F401 (job_dir: fixture)

from loraforge.cli import main as cli
from loraforge.core.checkpoint import last_complete


def _one_error_line(capsys, command: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"loraforge {command}: error:"), err
    return err[0]


def test_kill_inside_a_checkpoint_save_leaves_the_previous_checkpoint(job_dir, tmp_path, capsys):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_job(job_dir, "delta_lora_folded", out, max_steps=4))
    proc = run_killed("inside-save", 4, job)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    staged = out / ".partial-checkpoint-4" / "checkpoint-4"
    assert (staged / "adapter_model.safetensors").is_file() and not (staged / "optimizer.pt").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert last_complete(str(out)) == (str(out / "checkpoint-2"), [])
    for command in (["ranks", str(staged)], ["export", str(staged), "--out", str(tmp_path / "x")]):
        assert cli(command) == 2
        assert "staging folder of a save that was interrupted" in _one_error_line(capsys, command[0])
    assert cli(["train", job, "--resume"]) == 0
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / ".partial-checkpoint-4").exists()


def test_kill_inside_the_final_save_leaves_no_adapter(job_dir, tmp_path, capsys):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_job(job_dir, "salora", out, max_steps=2))
    proc = run_killed("final-save", 0, job)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    for command in (["ranks", str(out)], ["export", str(out), "--out", str(tmp_path / "x")]):
        assert cli(command) == 2
        assert "holds no adapter_config.json" in _one_error_line(capsys, command[0])
