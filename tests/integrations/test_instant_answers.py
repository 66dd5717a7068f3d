"""Mistakes that need no model are answered in one line, exit code 2, before torch is imported.

Each case runs `loraforge_cli.main` in a fresh interpreter that records, at the moment the answer
is printed, whether torch has been imported, and is timed from the interpreter's start.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

# Runs main(argv), then reports whether torch is loaded; stderr holds the answer.
PROBE = """
import json, sys
from loraforge_cli import main
code = main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def answer(argv: list[str], cwd) -> tuple[dict, str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr, seconds


def assert_instant_one_line(argv, cwd, *expected):
    result, stderr, seconds = answer(argv, cwd)
    lines = stderr.strip().splitlines()
    assert result == {"code": 2, "torch": False}, (result, stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert seconds < 2.0, f"{seconds:.2f} s for {argv}"
    return lines[0]


def write_yaml(path: Path, job: dict) -> str:
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_misspelled_command_gets_did_you_mean(tmp_path):
    assert_instant_one_line(["trian"], tmp_path, "unknown command 'trian'", "did you mean 'train'?")
    assert_instant_one_line(["eval-styel"], tmp_path, "did you mean 'eval-style'?")


@pytest.mark.parametrize("steps", ["-3", "0"])
def test_max_steps_not_positive_is_refused(tmp_path, steps):
    assert_instant_one_line(["train", "--max-steps", steps], tmp_path, f"--max-steps: {steps}", "N >= 1")


def test_misspelled_training_and_adapter_keys_get_did_you_mean(tmp_path):
    job = {"adapter": {"method": "salora"}, "training": {"max_stepz": 3, "output_dir": "x"}}
    assert_instant_one_line(["train", write_yaml(tmp_path / "a.yaml", job)], tmp_path,
                            "training: unknown key(s) 'max_stepz' (did you mean 'max_steps'?)", "trl.SFTConfig")
    job = {"adapter": {"method": "salora", "target_densty": 0.5}}
    assert_instant_one_line(["train", write_yaml(tmp_path / "b.yaml", job)], tmp_path,
                            "adapter: unknown key(s) 'target_densty' (did you mean 'target_density'?)",
                            "SaLoRAConfig")
    job = {"adapter": {"method": "delta_lora", "update_ration": 2.0}}
    assert_instant_one_line(["train", write_yaml(tmp_path / "c.yaml", job)], tmp_path,
                            "did you mean 'update_ratio'?", "DeltaLoRAConfig")
    job = {"adapter": {"method": "salora"}, "trainig": {}}
    assert_instant_one_line(["train", write_yaml(tmp_path / "d.yaml", job)], tmp_path,
                            "'trainig' (did you mean 'training'?)")


def test_model_folder_without_config_json(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert_instant_one_line(["eval-style", "--model", str(empty), "--task", "yelp-neg2pos", "--inputs", "x",
                             "--references", "y"], tmp_path, "--model:", "holds no config.json")
    assert_instant_one_line(["train-style-classifier", "--train-0", "a", "--train-1", "b", "--base", str(empty)],
                            tmp_path, "--base:", "holds no config.json")


def test_export_into_a_non_empty_folder_needs_overwrite(tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    out = tmp_path / "stock"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_instant_one_line(["export", str(adapter), "--out", str(out)], tmp_path, "is not empty", "--overwrite")


def test_eval_style_adapter_from_another_base(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from loraforge import testing

    other = testing.tiny_llama(seed=0, hidden=48)  # a base with other shapes
    adapter = tmp_path / "adapter"
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    line = assert_instant_one_line(
        ["eval-style", "--model", tiny_model_dir, "--adapter", str(adapter), "--task", "yelp-neg2pos",
         "--inputs", "x", "--references", "y"], tmp_path, "was trained on another base", "--model")
    assert "size 48 there" in line
    # the same adapter on the base it was made for passes the check (and fails later, on the missing inputs)
    other_dir = testing.save_tiny_model(tmp_path / "other", hidden=48)
    from loraforge_checks import check_adapter_fits

    assert check_adapter_fits(str(adapter), other_dir) is None


def test_yaml_syntax_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter:\n  method: salora\n  r: [8\n")
    assert_instant_one_line(["train", str(bad)], tmp_path, "YAML syntax error at line", "indentation")
