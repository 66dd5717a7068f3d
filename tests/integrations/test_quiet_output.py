"""No noise a user cannot act on: `import loraforge` prints nothing, and the library messages that
loraforge filters (bitsandbytes' missing-kernels line, transformers' LOAD REPORT for a classifier's
new head, KenLM's note on ARPA files) are gone while their neighbours still show."""
from __future__ import annotations

import subprocess
import sys

ENV_CODE = "import os; os.environ['HF_HUB_OFFLINE'] = '1'\n"


def run_python(code: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENV_CODE + code], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_import_loraforge_prints_nothing_with_bitsandbytes_installed():
    import bitsandbytes  # noqa: F401  (the test is about a machine that has it)

    done = run_python("import loraforge")
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stdout + done.stderr


def test_bitsandbytes_kernels_line_is_dropped_and_other_lines_are_not():
    # The line is logged at bitsandbytes' import only on CPUs with AVX512-BF16, so it is emitted here
    # on its logger, as bitsandbytes does, after `import loraforge` installed the filter.
    done = run_python(
        "import logging, loraforge\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure', 'x')\n"
        "log.warning('some other bitsandbytes warning')\n")
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr and "some other bitsandbytes warning" in done.stderr


def test_classifier_load_report_is_dropped_only_inside_the_block(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    load = "AutoModelForSequenceClassification.from_pretrained(r'%s', num_labels=2)" % (tmp_path / "bert")
    head = "from transformers import AutoModelForSequenceClassification\nfrom loraforge.quiet import new_head_expected\n"
    plain = run_python(head + load)
    quiet = run_python(head + "with new_head_expected():\n    " + load)
    assert plain.returncode == 0 and quiet.returncode == 0, plain.stderr + quiet.stderr
    assert "LOAD REPORT" in plain.stderr  # the control: transformers does report the new head
    assert "LOAD REPORT" not in quiet.stderr and "\x1b[" not in quiet.stderr, quiet.stderr


def test_kenlm_arpa_note_is_silenced(tmp_path):
    from loraforge.eval.arpa import write_arpa

    arpa = tmp_path / "lm.arpa"
    write_arpa(["the food is good .", "the staff is nice ."], str(arpa), order=2)
    raw = run_python(f"import kenlm; kenlm.Model(r'{arpa}')")
    ours = run_python(f"from loraforge.eval.metrics import perplexity\n"
                      f"print(perplexity(r'{arpa}', ['the food is nice .'])['score'] > 1)")
    assert "binary file" in raw.stderr  # the control: KenLM does print the note
    assert ours.stdout.strip() == "True" and ours.stderr == "", ours.stderr


def test_a_file_that_is_not_a_language_model_is_one_line(tmp_path):
    import pytest

    from loraforge.eval.metrics import perplexity

    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="is not an ARPA or KenLM binary file"):
        perplexity(str(bad), ["a"])


def test_readme_python_api_raises_no_future_warning():
    # what the README's Python block does before training: import loraforge, then build an SFTConfig
    done = run_python("import warnings; warnings.simplefilter('default')\n"
                      "import loraforge\nfrom trl import SFTConfig\n"
                      "SFTConfig(output_dir='out', max_steps=1, use_cpu=True, bf16=False)\n", cwd=None)
    assert done.returncode == 0, done.stderr
    assert "FutureWarning" not in done.stderr, done.stderr
