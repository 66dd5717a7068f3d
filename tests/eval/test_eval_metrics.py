"""BLEU, reference files, the Kneser-Ney ARPA writer, perplexity, the report and CLI errors.

Fast tests: hand-made data plus, where available, the shared Yelp slice.
"""
from __future__ import annotations

import json
import math
import random
import time

import kenlm
import pytest
import sacrebleu

from loraforge.cli import main
from loraforge.data import yelp_dir
from loraforge.eval import TASKS, build_prompt, bleu, make_report, load_results, perplexity, read_lines, read_references, write_arpa

YELP = yelp_dir()  # the slice shipped in plugin/data/yelp (CC BY-SA 4.0, README beside it)

HYPS = ["the cat sat on the mat .", "a quick brown fox jumps over the dog ."]
REFS_A = ["the cat sat on a mat .", "the quick brown fox jumped over the lazy dog ."]
REFS_B = ["there is a cat on the mat .", "a fast brown fox jumps over a dog ."]


# --- prompts --------------------------------------------------------------------------------

def test_prompts_match_the_training_format_and_the_paper_instructions():
    from loraforge.train import alpaca_prompt  # what SFT trains on: zero-shot means the same layout

    paper = {  # Table A3 of the SaLoRA paper
        "yelp-neg2pos": "Please change the sentiment of the following sentence to be more positive.",
        "yelp-pos2neg": "Please change the sentiment of the following sentence to be more negative.",
        "gyafc-inf2for": "Please rewrite the following sentence to be more formal.",
        "gyafc-for2inf": "Please rewrite the following sentence to be more informal.",
    }
    assert set(TASKS) == set(paper)
    for task, instruction in paper.items():
        record = {"instruction": instruction, "input": "the food was cold .", "output": "x"}
        assert build_prompt(task, "the food was cold .") == alpaca_prompt(record)
        assert build_prompt(task, "the food was cold .", "paper").endswith("Input: the food was cold .\n\nResponse:")


# --- BLEU -------------------------------------------------------------------------------------

def test_bleu_matches_sacrebleu_single_and_multi_reference():
    single = bleu(HYPS, [REFS_A])
    multi = bleu(HYPS, [REFS_A, REFS_B])
    assert single["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS_A]).score, abs=1e-9)
    assert multi["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS_A, REFS_B]).score, abs=1e-9)
    assert multi["score"] > single["score"]  # a second reference can only add matches
    assert "nrefs:2" in multi["signature"] and "tok:13a" in multi["signature"] and "case:mixed" in multi["signature"]


def test_multi_reference_streams_are_per_input():
    # Each output equals exactly one of its references, found in different reference files:
    # only a correct reference layout (file k holds reference k of every input) gives 100.
    refs_a = [HYPS[0], "completely unrelated words here"]
    refs_b = ["nothing alike at all", HYPS[1]]
    assert bleu(HYPS, [refs_a, refs_b])["score"] == pytest.approx(100.0)
    assert bleu(HYPS, [refs_a])["score"] < 70


def test_bleu_lowercase_option_is_case_insensitive():
    upper = [h.upper() for h in HYPS]
    assert bleu(upper, [HYPS])["score"] < 10
    result = bleu(upper, [HYPS], lowercase=True)
    assert result["score"] == pytest.approx(100.0) and "case:lc" in result["signature"]


def test_reference_files_tab_and_plain_formats(tmp_path):
    inputs = ["the food was cold .", "service was slow ."]
    rewrites = ["The food was hot.", "Service was quick."]
    tab = tmp_path / "reference.0"
    tab.write_text("".join(f"{i}\t{r}\n" for i, r in zip(inputs, rewrites)))
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(r + "\n" for r in rewrites))
    assert read_references(tab, inputs) == rewrites
    assert read_references(plain, inputs) == rewrites
    with pytest.raises(ValueError, match=r"--references.*line 2"):
        read_references(tab, [inputs[0], "something else ."])
    with pytest.raises(ValueError, match=r"--references.*2 references.*3 sentences"):
        read_references(plain, inputs + ["one more ."])
    with pytest.raises(FileNotFoundError, match="--references"):
        read_references(tmp_path / "missing.txt", inputs)


# --- ARPA writer and perplexity ---------------------------------------------------------------

TOY = [
    "the cat sat on the mat", "the dog sat on the log", "a cat saw a dog", "the cat ate the fish",
    "my dog ate my homework", "the mat was on the floor", "a dog sat on a cat", "the fish saw the cat",
]


def _state_after(model, context):
    """The LM state after the sentence start and the words of `context`."""
    state = kenlm.State()
    model.BeginSentenceWrite(state)
    for word in context:
        out = kenlm.State()
        model.BaseScore(state, word, out)
        state = out
    return state


def _context_mass(model, vocab, context):
    state = _state_after(model, context)
    return sum(10 ** model.BaseScore(state, w, kenlm.State()) for w in vocab)


def _vocab(lines):
    return sorted({w for s in lines for w in s.split()}) + ["</s>", "<unk>"]


@pytest.mark.parametrize("order", [2, 3, 4])
def test_arpa_probabilities_sum_to_one(tmp_path, order):
    path = tmp_path / "toy.arpa"
    write_arpa(TOY, path, order=order)
    model = kenlm.Model(str(path))
    assert model.order == order
    vocab = _vocab(TOY)
    contexts = [[], ["the"], ["the", "cat"], ["on", "the"], ["zebra"], ["cat", "zebra", "the"], ["fish"]]
    for context in contexts:
        assert _context_mass(model, vocab, context) == pytest.approx(1.0, abs=1e-5), context


def test_kneser_ney_uses_continuation_counts(tmp_path):
    # "francisco" and "dog" occur equally often, but "francisco" only ever after "san": Kneser-Ney
    # gives it the smaller lower-order probability, where a raw-count estimate would tie them.
    lines = ["i love san francisco"] * 5 + [f"{w} dog barked" for w in ("a", "the", "my", "one", "big")]
    words = [w for s in lines for w in s.split()]
    assert words.count("francisco") == words.count("dog")
    path = tmp_path / "kn.arpa"
    write_arpa(lines, path, order=3)
    model = kenlm.Model(str(path))
    after_unseen = {w: _score_after(model, ["zebra"], w) for w in ("francisco", "dog")}
    assert after_unseen["francisco"] < after_unseen["dog"]
    assert _context_mass(model, _vocab(lines), ["zebra"]) == pytest.approx(1.0, abs=1e-5)


def _score_after(model, context, word):
    return model.BaseScore(_state_after(model, context), word, kenlm.State())


def test_yelp_lm_sums_to_one_and_prefers_fluent_text(tmp_path):
    arpa = tmp_path / "positive.arpa"
    start = time.perf_counter()
    assert main(["train-kenlm", "--corpus", str(YELP / "sentiment.dev.1"), "--order", "5", "--out", str(arpa)]) == 0
    assert time.perf_counter() - start < 20  # 2000 sentences: well under a second on a laptop
    model = kenlm.Model(str(arpa))
    dev = read_lines(YELP / "sentiment.dev.1")
    for context in ([], ["the", "food", "was"], ["i", "will", "definitely"], ["service", "zebra"]):
        assert _context_mass(model, _vocab(dev), context) == pytest.approx(1.0, abs=1e-4), context

    fluent = read_lines(YELP / "sentiment.test.1")
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(s.split(), len(s.split()))) for s in fluent]
    p_fluent = perplexity(str(arpa), fluent)
    p_shuffled = perplexity(model, shuffled)
    assert p_fluent["score"] < 0.5 * p_shuffled["score"]
    # The stated definition: PPL = 10^(-sum log10 p / tokens), </s> counted once per sentence.
    log10_total = sum(model.score(s, bos=True, eos=True) for s in fluent)
    tokens = sum(len(s.split()) + 1 for s in fluent)
    assert p_fluent["counts_eos"] and p_fluent["tokens"] == tokens
    assert p_fluent["score"] == pytest.approx(10 ** (-log10_total / tokens), rel=1e-9)


def test_bigram_model_closed_form(tmp_path):
    # "a b c d" once: every count is 1, so the counts-of-counts beyond n1 are empty and the
    # fallback discount D1 = 0.5 applies. Unigrams (continuation counts, all 1): u = 0.5 / 5,
    # gamma = 0.5, uniform share gamma / 6 over a, b, c, d, </s>, <unk>, so p(seen) = 11/60 and
    # p(<unk>) = 1/12. Each bigram context has one successor: u = 0.5, gamma = 0.5.
    path = tmp_path / "bi.arpa"
    write_arpa(["a b c d"], path, order=2)
    result = perplexity(str(path), ["a b", "c zebra"])
    seen, unseen_after_context = 0.5 + 0.5 * 11 / 60, 0.5 * 11 / 60
    probs = [seen, seen, unseen_after_context,      # a|<s>, b|a, </s>|b
             unseen_after_context, 0.5 / 12, 11 / 60]  # c|<s>, <unk>|c, </s>|<unk> (no context)
    assert result["tokens"] == 6 and result["oov"] == 1
    assert result["score"] == pytest.approx(math.prod(probs) ** (-1 / 6), rel=1e-6)


# --- report -----------------------------------------------------------------------------------

def _result(system, task, acc, bleu_score, ppl):
    return {"system": system, "task": task, "metrics": {"acc": acc, "bleu": bleu_score, "ppl": ppl},
            "bleu": {"signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"},
            "ppl": {"normalize": "yelp"}}


def test_report_is_shaped_like_table_2(tmp_path, capsys):
    files = []
    rows = [_result("LoRA", "yelp-neg2pos", 71.0, 25.96, 82.2), _result("SaLoRA", "yelp-neg2pos", 73.2, 24.76, 76.49),
            _result("LoRA", "yelp-pos2neg", 92.8, 31.83, 83.03)]
    for i, row in enumerate(rows):
        files.append(tmp_path / f"results{i}.json")
        files[-1].write_text(json.dumps(row))
    out = tmp_path / "report.md"
    assert main(["eval-style-report", *map(str, files), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    lines = printed.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["System", "Yelp neg→pos ACC ↑", "Yelp neg→pos BLEU ↑", "Yelp neg→pos PPL ↓",
                      "Yelp pos→neg ACC ↑", "Yelp pos→neg BLEU ↑", "Yelp pos→neg PPL ↓"]
    assert lines[2] == "| LoRA | 71.00 | 25.96 | 82.20 | 92.80 | 31.83 | 83.03 |"
    assert lines[3] == "| SaLoRA | 73.20 | 24.76 | 76.49 | – | – | – |"
    assert make_report(load_results(files)) == printed


# --- command-line errors ----------------------------------------------------------------------

def test_cli_errors_name_the_flag(tmp_path, capsys):
    inputs = tmp_path / "in.txt"
    inputs.write_text("a b c\nd e f\n")
    refs = tmp_path / "refs.txt"
    refs.write_text("a b c\n")
    hyps = tmp_path / "hyps.txt"
    hyps.write_text("a b c\nd e f\n")
    common = ["--out", str(tmp_path / "r.json"), "--hypotheses", str(hyps)]

    with pytest.raises(SystemExit) as exc:
        main(["eval-style", "--task", "yelp-sideways", "--inputs", str(inputs), "--references", str(refs), *common])
    assert exc.value.code == 2 and "--task" in capsys.readouterr().err

    assert main(["eval-style", "--task", "yelp-neg2pos", "--inputs", str(tmp_path / "nope.txt"),
                 "--references", str(refs), *common]) == 2
    assert "--inputs" in capsys.readouterr().err

    assert main(["eval-style", "--task", "yelp-neg2pos", "--inputs", str(inputs), "--references", str(refs), *common]) == 2
    err = capsys.readouterr().err
    assert "--references" in err and "1 references" in err

    assert main(["eval-style", "--task", "yelp-neg2pos", "--inputs", str(inputs), "--references", str(hyps),
                 "--model", str(tmp_path), *common]) == 2
    assert "--model" in capsys.readouterr().err

    assert main(["train-kenlm", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x.arpa")]) == 2
    assert "--corpus" in capsys.readouterr().err
