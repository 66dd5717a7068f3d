"""Helpers of the robustness tests (tests/core/test_resume_cli.py and its siblings): a folder with the tiny model, Alpaca data and a CoRA basis, and
tiny `loraforge train` jobs built from example_configs/train/tiny/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraforge import testing

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "example_configs" / "train" / "tiny"


@pytest.fixture(scope="session")
def job_dir(tmp_path_factory):
    """tiny-model/, alpaca.jsonl and cora-basis.safetensors, as the tiny configs' setup lines make them."""
    from loraforge.cli import main as cli

    root = tmp_path_factory.mktemp("jobs")
    testing.save_tiny_model(root / "tiny-model")
    (root / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in testing.alpaca_records()))
    tuned = [testing.save_tiny_model(root / f"tuned-{i}", seed=i) for i in (1, 2, 3)]
    assert cli(["cora-extract", "--models", *map(str, tuned), "--rank", "4", "--targets", "q_proj,k_proj,v_proj,o_proj",
                "--out", str(root / "cora-basis.safetensors")]) == 0
    return root


# method -> (tiny config, adapter fields changed for a 6-step job)
METHODS = {
    "salora": ("salora.yaml", {"window_end": 0.9}),  # of 6 steps: window (1, 5], open at a kill after step 4
    "delta_lora_folded": ("delta_lora.yaml", {"start_step": 2}),
    "delta_lora_in_place": ("delta_lora.yaml", {"start_step": 2, "propagation": "in_place"}),
    "cora": ("cora_tb.yaml", {}),
}


def tiny_job(job_dir: Path, method: str, output_dir, max_steps: int = 6, save_steps: int = 2, **training) -> dict:
    """The tiny config of `method` with absolute paths, `max_steps` steps and a checkpoint every `save_steps`."""
    name, adapter = METHODS[method]
    cfg = yaml.safe_load((TINY / name).read_text())
    for key in ("model", "data"):
        cfg[key] = str(job_dir / cfg[key])
    if "basis_path" in cfg["adapter"]:
        cfg["adapter"]["basis_path"] = str(job_dir / cfg["adapter"]["basis_path"])
    cfg["adapter"].update(adapter)
    cfg["training"].update(output_dir=str(output_dir), max_steps=max_steps, save_strategy="steps",
                           save_steps=save_steps, disable_tqdm=True, logging_steps=100, **training)
    return cfg


def write_job(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# Runs `loraforge train` in a child process that SIGKILLs itself at a chosen point: right after the
# checkpoint of step N is saved (`save`); inside the save of step N, once the model is written and
# before the optimizer is (`inside-save`); inside the final adapter's save, once its weights are in
# place and before its config is (`final-save`). `pause` sleeps 10 s after the checkpoint of step N.
KILLER = """
import os, signal, sys, time
import transformers.trainer
from transformers import Trainer, TrainerCallback
where, step = sys.argv[1], int(sys.argv[2])
def die():
    os.kill(os.getpid(), signal.SIGKILL)
class Kill(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if where == "save" and state.global_step == step:
            die()
        if where == "pause" and state.global_step == step:
            time.sleep(10)
replace = os.replace
def killing_replace(src, dst, *args, **kwargs):
    if where == "final-save" and str(dst).endswith("adapter_config.json"):
        die()
    return replace(src, dst, *args, **kwargs)
os.replace = killing_replace
transformers.trainer.DEFAULT_CALLBACKS.append(Kill)
save_optimizer = Trainer._save_optimizer_and_scheduler
def killing_save(self, output_dir):
    if where == "inside-save" and self.state.global_step == step:
        die()
    return save_optimizer(self, output_dir)
Trainer._save_optimizer_and_scheduler = killing_save
from loraforge_cli import main
sys.exit(main(sys.argv[3:]))
"""


def start_killed(where: str, step: int, *argv: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-c", KILLER, where, str(step), "train", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_killed(where: str, step: int, *argv: str) -> subprocess.CompletedProcess:
    proc = start_killed(where, step, *argv)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but the job lock (relative path -> content)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".loraforge.lock"}


def max_difference(dir_a, dir_b) -> float:
    """Largest elementwise difference between two saved adapters (every tensor; integer ones must be equal)."""
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(d) / "adapter_model.safetensors")) for d in (dir_a, dir_b))
    assert a.keys() == b.keys() and a
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
