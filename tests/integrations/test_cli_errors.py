"""Every command answers a user's mistake with one line (what is wrong, how to fix it), exit 2,
no traceback; `--debug` / LORAFORGE_DEBUG=1 give the traceback instead."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from loraforge.cli import main


def _job(tmp_path, model_dir, **adapter) -> dict:
    return {
        "model": model_dir,
        "max_length": 160,
        "adapter": {"method": "salora", "r": 4, "target_modules": ["q_proj", "v_proj"], **adapter},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "report_to": [], "use_cpu": True,
                     "save_strategy": "no", "disable_tqdm": True},
    }


def _write(tmp_path, job, name="job.yaml") -> str:
    path = tmp_path / name
    path.write_text(job if isinstance(job, str) else yaml.safe_dump(job))
    return str(path)


def _one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"loraforge {argv[0]}: error: ")
    return lines[0]


def test_missing_config_file(capsys, tmp_path):
    line = _one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")])
    assert "no config file" in line and "example_configs/train" in line


def test_yaml_syntax_error_names_line_and_column(capsys, tmp_path):
    path = _write(tmp_path, "adapter:\n  method: salora\n  r: [8\ntraining: {}\n")
    line = _one_line_error(capsys, ["train", path])
    assert "YAML syntax error at line 4" in line


@pytest.mark.parametrize("adapter, expected", [
    ({"target_density": 1.5}, "target_density"),
    ({"method": "delta_lora", "lora_dropout": 0.1}, "lora_dropout"),
])
def test_out_of_range_field_is_the_config_error_alone(capsys, tmp_path, tiny_model_dir, adapter, expected):
    line = _one_line_error(capsys, ["train", _write(tmp_path, _job(tmp_path, tiny_model_dir, **adapter))])
    assert line.split("error: ", 1)[1].startswith(expected)


def test_target_modules_matching_nothing_lists_the_linear_names(capsys, tmp_path, tiny_model_dir):
    job = _job(tmp_path, tiny_model_dir, target_modules=["query", "value"])
    line = _one_line_error(capsys, ["train", _write(tmp_path, job)])
    assert "adapter.target_modules: ['query', 'value'] match no module" in line
    assert "'q_proj'" in line and "'down_proj'" in line  # the tiny Llama's own names, as the fix


def test_missing_model_folder_is_named_not_a_repo_id_error(capsys, tmp_path):
    job = _job(tmp_path, str(tmp_path / "models" / "llama-7b"))
    line = _one_line_error(capsys, ["train", _write(tmp_path, job)])
    assert "is not a model folder" in line and "Repo id" not in line


def test_missing_data_file(capsys, tmp_path, tiny_model_dir):
    job = {**_job(tmp_path, tiny_model_dir), "data": str(tmp_path / "alpaca.json")}
    assert "no file" in _one_line_error(capsys, ["train", _write(tmp_path, job)])


def test_ranks_on_a_missing_folder(capsys, tmp_path):
    assert "no adapter folder" in _one_line_error(capsys, ["ranks", str(tmp_path / "outputs" / "quickstart")])


def test_export_errors(capsys, tmp_path):
    assert "no adapter_config.json" in _one_line_error(capsys, ["export", str(tmp_path), "--out", str(tmp_path / "o")])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    line = _one_line_error(capsys, ["export", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "no base model folder" in line and "base_model_name_or_path" in line and "--base" in line


@pytest.mark.parametrize("argv, expected", [
    (["eval-style", "--hypotheses", "h.txt", "--task", "yelp-neg2pos", "--inputs", "in.txt",
      "--references", "ref.txt", "--out", "r.json"], "--inputs: no such file"),
    (["eval-style", "--adapter", "a", "--task", "yelp-neg2pos", "--inputs", "in.txt",
      "--references", "ref.txt", "--out", "r.json"], "--adapter needs --model"),
    (["eval-style-report", "missing.json"], "missing.json"),
    (["train-kenlm", "--corpus", "missing.txt", "--out", "lm/x.arpa"], "--corpus: no such file"),
    (["train-style-classifier", "--train-0", "a", "--train-1", "b", "--base", "models/bert", "--out", "c",
      "--names", "neg"], "--names needs two"),
])
def test_eval_commands(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in _one_line_error(capsys, argv)


def test_debug_flag_and_env_var_give_the_traceback(tmp_path, monkeypatch):
    argv = ["train", str(tmp_path / "nope.yaml")]
    with pytest.raises(ValueError, match="no config file"):
        main([*argv, "--debug"])
    monkeypatch.setenv("LORAFORGE_DEBUG", "1")
    with pytest.raises(ValueError, match="no config file"):
        main(argv)


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    """The real process: nothing else (warnings, tracebacks) reaches stderr."""
    proc = subprocess.run([sys.executable, "-m", "loraforge_cli", "train", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"loraforge train: error: no config file '{tmp_path / 'nope.yaml'}'; "
                                                "pass a YAML file (examples in example_configs/train/) or no "
                                                "argument for the shipped quickstart"]
