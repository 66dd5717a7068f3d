"""Every code block of README.md runs as written, with tiny stand-ins for what a reader has and a CPU
test cannot (a 7B model, a real data set, a GPU).

- ```python blocks run one by one, as written, each in a fresh namespace, in a scratch folder
  holding `alpaca_cleaned.json` (16 records of the shipped set). Only the model is swapped: the
  embedded model (`loraforge.models.default_model_path()`) is a saved tiny random Llama of
  `loraforge.testing`, and `from_pretrained` of a name that is not an existing folder
  ("path/to/llama-7b") gives that tiny Llama / tokenizer. Every other argument, `SFTConfig`'s
  included, is the block's own, so a block that would fail on a CPU fails here. A block that is a
  fragment may use these names, standing for what the surrounding text assumes: `base` and `model`
  (a tiny Llama), `args` / `sft_args` (a CPU SFTConfig of 2 steps), `ds` (`alpaca_dataset` of those
  records), `loraforge`, `get_peft_model`, `SFTTrainer`, `SFTConfig`.
- ```yaml blocks must parse.
- ```bash blocks: every `loraforge ...` command must pass its argument parser (the same one the
  console script uses: flags, choices, required options), and every path it names inside this
  repository (`plugin/...`, `example_configs/...`) must exist. Commands are checked, not run: the
  quickstart and the style evaluation take minutes; other tests run each command's work. Lines that
  are not `loraforge` commands (pip, pytest, cut) are not checked.
- A block right after the line `<!-- readme-test: skip (reason) -->` is skipped, reason given.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->\s*$")


def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """(line number, language, code, skip reason or None) of every fenced block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2),
                       skip.group(1) if skip else None))
    return blocks


BLOCKS = readme_blocks()


def _params(lang):
    # the code is padded to its README line, so a traceback points at the README's own line
    return [pytest.param("\n" * line + code, skip, id=f"line{line}") for line, kind, code, skip in BLOCKS
            if kind == lang]


def _run_skip(skip):
    if skip:
        pytest.skip(f"README says: {skip}")


def test_every_block_is_checked_and_every_skip_says_why():
    assert {kind for _, kind, _, _ in BLOCKS} <= {"python", "yaml", "bash"}, "a block in a language this test cannot check"
    skips = [skip for *_, skip in BLOCKS if skip is not None]
    assert skips, "no skip marker found: the README marks the blocks a CPU cannot run"
    assert all(len(skip.split()) >= 3 for skip in skips)


TINY_SFT = dict(max_steps=2, per_device_train_batch_size=2, use_cpu=True, bf16=False, report_to=[],
                save_strategy="no", disable_tqdm=True, max_length=256, logging_steps=1,
                activation_checkpointing=False)


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    import json

    import transformers
    import trl
    from peft import get_peft_model

    import loraforge
    import loraforge.models
    from loraforge import testing
    from loraforge.data import alpaca_dataset

    monkeypatch.chdir(tmp_path)
    records = testing.alpaca_records()[:16]
    (tmp_path / "alpaca_cleaned.json").write_text(json.dumps(records))

    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tok = transformers.AutoTokenizer.from_pretrained

    def model_from_pretrained(name, *args, **kwargs):
        return real_model(name, *args, **kwargs) if os.path.isdir(str(name)) else testing.tiny_llama(seed=0)

    def tokenizer_from_pretrained(name, *args, **kwargs):
        return real_tok(name, *args, **kwargs) if os.path.isdir(str(name)) else testing.tiny_tokenizer()

    def sft_config(*args, **kwargs):  # the fragments' `args`: what their surrounding text assumes
        return trl.SFTConfig(*args, **{**TINY_SFT, **kwargs})

    tiny_dir = testing.save_tiny_model(tmp_path / "embedded-model")
    monkeypatch.setattr(loraforge.models, "default_model_path", lambda: tiny_dir)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", tokenizer_from_pretrained)  # TRL's lookup

    def namespace():
        args = sft_config(output_dir=str(tmp_path / "args"))
        return {"__name__": "readme", "loraforge": loraforge, "get_peft_model": get_peft_model,
                "SFTTrainer": trl.SFTTrainer, "SFTConfig": trl.SFTConfig, "base": testing.tiny_llama(seed=0),
                "model": testing.tiny_llama(seed=0), "args": args, "sft_args": args,
                "ds": alpaca_dataset(records)}

    return namespace


@pytest.mark.parametrize("code, skip", _params("python"))
def test_python_block_runs(code, skip, stand_ins):
    _run_skip(skip)
    exec(compile(code, "README.md", "exec"), stand_ins())


@pytest.mark.parametrize("code, skip", _params("yaml"))
def test_yaml_block_parses(code, skip):
    _run_skip(skip)
    assert isinstance(yaml.safe_load(code), dict)


def _commands(code: str) -> list[list[str]]:
    lines, current = [], ""
    for raw in code.splitlines():
        current += raw.rstrip("\\").rstrip() + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            lines.append(current)
            current = ""
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


@pytest.mark.parametrize("code, skip", _params("bash"))
def test_bash_block_commands_parse_and_name_existing_files(code, skip):
    from loraforge_cli import COMMANDS, parse

    _run_skip(skip)
    for words in _commands(code):
        if not words or words[0] != "loraforge":
            continue
        assert len(words) > 1 and words[1] in COMMANDS, words
        if "--help" not in words:
            try:
                parse(words[1], words[2:])
            except SystemExit as exc:
                pytest.fail(f"README command does not parse ({exc.code}): {' '.join(words)}")
        for word in words[2:]:
            if word.startswith(("plugin/", "example_configs/")):
                assert (ROOT / word).exists(), f"README names {word}, which is not in the repository"
