"""`loraforge train` killed with SIGKILL after a checkpoint and resumed (by --resume and by the YAML key)
ends with the adapter of the uninterrupted run; re-running without resuming refuses and leaves the
checkpoints as they were."""
from __future__ import annotations

import shutil
import signal

import pytest

from loraforge.cli import main as cli

from robust_jobs import job_dir, max_difference, run_killed, tiny_job, tree_bytes, write_job  # noqa: F401 (job_dir: fixture)


@pytest.mark.parametrize("method", ["salora", "delta_lora_folded", "delta_lora_in_place", "cora"])
def test_killed_job_resumes_to_the_uninterrupted_adapter(job_dir, tmp_path, method, capsys):
    full, killed, by_key = tmp_path / "full", tmp_path / "killed", tmp_path / "by_key"
    cfg = tiny_job(job_dir, method, full)
    if method == "salora":  # the kill after step 4 falls inside the budget window (gates and λ moving)
        from loraforge import SaLoRAConfig

        start, end = SaLoRAConfig(window_start=cfg["adapter"]["window_start"],
                                  window_end=cfg["adapter"]["window_end"]).resolve_window(6)
        assert start < 4 < end
    job = write_job(tmp_path / "job.yaml", cfg)
    assert cli(["train", job]) == 0

    proc = run_killed("save", 4, job, "--output-dir", str(killed))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (killed / "adapter_config.json").exists()
    shutil.copytree(killed, by_key)

    before = tree_bytes(killed)
    assert any(k.startswith("checkpoint-4/") for k in before)
    capsys.readouterr()
    assert cli(["train", job, "--output-dir", str(killed)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err, err
    assert tree_bytes(killed) == before  # nothing rewritten

    assert cli(["train", job, "--output-dir", str(killed), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out
    keyed = tiny_job(job_dir, method, by_key, resume_from_checkpoint=True)
    assert cli(["train", write_job(tmp_path / "keyed.yaml", keyed)]) == 0

    for resumed in (killed, by_key):
        assert max_difference(full, resumed) <= 1e-6
    assert max_difference(full, killed) == max_difference(full, by_key)


def test_resume_from_a_named_checkpoint_and_refusals(job_dir, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = tiny_job(job_dir, "delta_lora_folded", out, max_steps=4)
    assert cli(["train", write_job(tmp_path / "a.yaml", cfg), "--resume"]) == 2  # nothing to resume
    assert "holds no complete checkpoint" in capsys.readouterr().err
    assert cli(["train", write_job(tmp_path / "a.yaml", cfg)]) == 0
    shutil.rmtree(out / "checkpoint-4")
    (out / "checkpoint-2" / "trainer_state.json").unlink()  # as a kill inside an older tool's save leaves it
    named = tiny_job(job_dir, "delta_lora_folded", out, max_steps=4, resume_from_checkpoint=str(out / "checkpoint-2"))
    assert cli(["train", write_job(tmp_path / "b.yaml", named)]) == 2
    assert "is not a complete checkpoint" in capsys.readouterr().err
    assert cli(["train", write_job(tmp_path / "a.yaml", cfg), "--resume"]) == 2
    assert "skipping the incomplete checkpoint" in capsys.readouterr().out
    assert cli(["train", write_job(tmp_path / "a.yaml", cfg), "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
