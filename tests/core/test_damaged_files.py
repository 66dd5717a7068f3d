"""Damaged files and bad data: exit code 2, one line on stderr naming the file (or the key), no traceback."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml
from robust_jobs import job_dir, tiny_job, write_job  # noqa: F401 (job_dir: fixture)
from safetensors.torch import load_file, save_file

from loraforge import testing
from loraforge.cli import main as cli


@pytest.fixture(scope="module")
def adapters(job_dir, tmp_path_factory):
    """A trained adapter per method (2 steps), and a base of another width."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for method in ("salora", "delta_lora_folded", "cora"):
        cfg = tiny_job(job_dir, method, root / method, max_steps=2, save_steps=100)
        assert cli(["train", write_job(root / f"{method}.yaml", cfg)]) == 0
        out[method] = root / method
    out["wide_base"] = testing.save_tiny_model(root / "wide", hidden=96)
    return out


def _refused(capsys, argv, *needles) -> str:
    capsys.readouterr()
    assert cli(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith(f"loraforge {argv[0]}: error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _copy(src, tmp_path, name="adapter"):
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint-*"))
    return dst


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


DATA_CASES = {
    "empty": (b"", "holds no records"),
    "empty_list": (b"[]", "holds no records"),
    "output_null": (json.dumps([{"instruction": "a", "output": None}]).encode(), "output: null; it must be a string"),
    "output_42": (json.dumps({"instruction": "a", "output": 42}).encode() + b"\n", "output: 42; it must be a string"),
    "not_utf8": (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff\xfe", "output": "c"}\n',
                 "is not UTF-8 text (line 2"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_file(job_dir, tmp_path, capsys, case):
    content, needle = DATA_CASES[case]
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    cfg = tiny_job(job_dir, "delta_lora_folded", tmp_path / "out", max_steps=2)
    cfg["data"] = str(data)
    _refused(capsys, ["train", write_job(tmp_path / "job.yaml", cfg)], str(data), needle)


@pytest.mark.parametrize("field, value, needle", [
    ("learning_rate", "abc", "training.learning_rate: 'abc' is not a finite number"),
    ("learning_rate", float("nan"), "training.learning_rate: nan is not a finite number"),
])
def test_bad_training_number(job_dir, tmp_path, capsys, field, value, needle):
    cfg = tiny_job(job_dir, "delta_lora_folded", tmp_path / "out", max_steps=2)
    cfg["training"][field] = value
    path = write_job(tmp_path / "job.yaml", cfg)
    if value != value:  # yaml.safe_dump writes nan as .nan, as a user would
        assert ".nan" in open(path).read()
    _refused(capsys, ["train", path], needle)


def test_gate_lr_inf_is_refused(job_dir, tmp_path, capsys):
    cfg = tiny_job(job_dir, "salora", tmp_path / "out", max_steps=2)
    cfg["adapter"]["gate_lr"] = float("inf")
    _refused(capsys, ["train", write_job(tmp_path / "job.yaml", cfg)], "gate_lr", "got inf")


@pytest.mark.parametrize("damage, needle", [
    ("nan", "non-finite entries"), ("zero_column", "an all-zero column")])
def test_cora_basis_with_nan_or_a_zero_column_is_refused(job_dir, tmp_path, capsys, damage, needle):
    basis = load_file(str(job_dir / "cora-basis.safetensors"))
    key = sorted(basis)[0]
    basis[key] = basis[key].clone()
    if damage == "nan":
        basis[key][0, 0] = float("nan")
    else:
        basis[key][:, 1] = 0.0
    bad = tmp_path / "basis.safetensors"
    save_file(basis, str(bad))
    cfg = tiny_job(job_dir, "cora", tmp_path / "out", max_steps=2)
    cfg["adapter"]["basis_path"] = str(bad)
    _refused(capsys, ["train", write_job(tmp_path / "job.yaml", cfg)], str(bad), needle)


def test_truncated_weights_empty_config_and_no_peft_type(adapters, tmp_path, capsys):
    trunc = _copy(adapters["salora"], tmp_path, "trunc")
    weights = trunc / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    for command in (["ranks", str(trunc)], ["export", str(trunc), "--out", str(tmp_path / "x")]):
        _refused(capsys, command, str(weights), "truncated safetensors file")
    empty = _copy(adapters["salora"], tmp_path, "empty")
    (empty / "adapter_config.json").write_text("")
    for command in (["ranks", str(empty)], ["export", str(empty), "--out", str(tmp_path / "x")]):
        _refused(capsys, command, str(empty / "adapter_config.json"), "is empty")
    no_type = _copy(adapters["delta_lora_folded"], tmp_path, "no_type")
    _edit_config(no_type, peft_type=None)
    _refused(capsys, ["export", str(no_type), "--out", str(tmp_path / "y")], str(no_type / "adapter_config.json"),
             "has no `peft_type`")
    bare = tmp_path / "checkpoint-9"
    bare.mkdir()
    _refused(capsys, ["ranks", str(bare)], str(bare), "adapter_config.json")


def test_adapter_onto_a_base_of_another_width(adapters, tmp_path, capsys):
    line = _refused(capsys, ["export", str(adapters["delta_lora_folded"]), "--base", adapters["wide_base"], "--out",
                             str(tmp_path / "x")], "adapter_model.safetensors")
    assert "lora_A.weight has shape (4, 64)" in line and "(in_features 96)" in line and "self_attn." in line


@pytest.mark.parametrize("method, changes, needle", [
    ("delta_lora_folded", {"update_ratio": 3.0}, "update_ratio"),
    ("salora", {"lora_alpha": 32}, "was trained with r=4 and scaling 2"),
    ("salora", {"lora_alpha": None}, "was trained with r=4 and scaling 2"),
    ("cora", {"lora_alpha": 4}, "was trained with r=4 and scaling 2"),
])
def test_config_edited_out_of_step_with_the_weights(adapters, tmp_path, capsys, method, changes, needle):
    folder = _copy(adapters[method], tmp_path)
    _edit_config(folder, **changes)
    _refused(capsys, ["export", str(folder), "--out", str(tmp_path / "x")], str(folder), needle)


def test_non_finite_adapter_is_not_exported(adapters, tmp_path, capsys):
    folder = _copy(adapters["delta_lora_folded"], tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights))
    _refused(capsys, ["export", str(folder), "--out", str(tmp_path / "x")], str(weights), key, "non-finite")
    assert not (tmp_path / "x").exists()


def test_python_api_with_every_prompt_longer_than_max_length(job_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from loraforge import DeltaLoRAConfig, LoraForgeSFTTrainer
    from loraforge.core.config import ForgeConfigError
    from loraforge.data import alpaca_dataset

    args = SFTConfig(output_dir=str(tmp_path), max_length=8, use_cpu=True, report_to=[], max_steps=1)
    with pytest.raises(ForgeConfigError, match="max_length: every training example lost its response"):
        LoraForgeSFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(job_dir / "tiny-model")), args=args,
                            train_dataset=alpaca_dataset(str(job_dir / "alpaca.jsonl")), processing_class=tiny_tokenizer,
                            peft_config=DeltaLoRAConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))


def test_loaded_config_keeps_yaml_numbers(job_dir, tmp_path):
    """`learning_rate: 2e-4` (a string in YAML 1.1) is still taken as the number."""
    assert yaml.safe_load("lr: 2e-4")["lr"] == "2e-4"
    from trl import SFTConfig

    from loraforge.core.finite import check_numbers

    values = {"learning_rate": "2e-4", "max_steps": 3}
    check_numbers(values, SFTConfig, "training")
    assert values == {"learning_rate": 2e-4, "max_steps": 3}


def test_resume_true_through_the_python_api_skips_an_incomplete_checkpoint(tmp_path, lm_dataset):
    """`trainer.train(resume_from_checkpoint=True)` takes the last COMPLETE checkpoint, not an empty later folder."""
    from peft import get_peft_model
    from transformers import TrainingArguments

    from loraforge import DeltaLoRAConfig, LoraForgeTrainer

    def trainer(steps):
        model = get_peft_model(testing.tiny_llama(seed=0), DeltaLoRAConfig(r=4, target_modules=["q_proj"], start_step=1))
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, save_steps=2,
                                 save_strategy="steps", report_to=[], use_cpu=True, disable_tqdm=True)
        return LoraForgeTrainer(model=model, args=args, train_dataset=lm_dataset)

    trainer(2).train()
    (tmp_path / "checkpoint-3").mkdir()  # what a kill inside another tool's save leaves
    t = trainer(4)
    t.train(resume_from_checkpoint=True)
    assert t.state.global_step == 4 and (tmp_path / "checkpoint-4" / "trainer_state.json").is_file()
