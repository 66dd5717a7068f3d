"""The quality benchmark's own plumbing, on a tiny random Llama: fixed disjoint splits, every system
trains, AdaLoRA's ranks move, CoRA's basis is the one its source fine-tunes give, reruns resume."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import quality  # noqa: E402
import quality_data as qd  # noqa: E402


def test_shipped_splits_are_the_seeded_ones_and_disjoint():
    shipped = qd.load_splits()
    assert shipped == qd.make_splits()
    for source, parts in shipped.items():
        train, test = set(parts["train"]), set(parts["test"])
        assert train and test and not train & test, source
        assert len(train) == len(parts["train"]) and len(test) == len(parts["test"])
    # the test pairs are really distinct sentences from the training pairs, not only distinct line numbers
    for d in qd.DIRECTIONS:
        assert not {p for p, _ in qd.yelp_pairs(d, "train")} & {p for p, _ in qd.yelp_pairs(d, "test")}


def test_collate_labels_only_the_response(tmp_path):
    examples = [([5, 6, 7, 8, 9], 2), ([1, 2, 3], 1)]
    b = qd.collate(examples, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 0, 1, 2, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert b["logits_to_keep"] == 3
    assert b["labels"].tolist() == [[-100, 8, 9], [-100, -100, 3]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from loraforge.testing import save_tiny_model

    root = tmp_path_factory.mktemp("quality")
    model = save_tiny_model(root / "model")
    out = root / "results.jsonl"
    argv = ["--model", model, "--steps", "6", "--seeds", "0", "--lrs", "5e-3", "--basis-steps", "3", "--out", str(out)]
    assert quality.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {"argv": argv, "out": out, "rows": {r["system"]: r for r in rows}, "model": model}


def test_every_system_trains(run):
    rows = run["rows"]
    assert set(rows) == set(quality.SYSTEMS)
    base = rows["base"]["nll"]["all"]
    for system in quality.SYSTEMS[1:]:
        assert rows[system]["moved"] > 0, system
        # every adapter starts as the identity (B = 0, E = 0 or A = 0), so an unchanged NLL means no training
        assert rows[system]["nll"]["all"] != base, system
        assert rows[system]["trainable"] > 0 and rows[system]["kept"] > 0


def test_adaptive_ranks_fall_to_the_budget(run):
    ada = run["rows"]["adalora"]["ranks"]
    assert len(ada) == 2 * 7 and max(ada) <= 8 and sum(ada) < 8 * len(ada)  # init_r 8, pruned towards 4
    sal = run["rows"]["salora"]
    assert sal["kept"] < sal["trainable"]


def test_cora_basis_is_the_fine_tunes_delta_subspace(run):
    work = Path(str(run["out"].with_suffix("")) + "_cora")
    basis_file = work / "basis.safetensors"
    with safe_open(str(basis_file), "pt") as f:
        meta = json.loads(f.metadata()["loraforge_cora"])
    assert sorted(s["name"] for s in meta["sources"]) == sorted(quality.BASIS_SOURCES)
    assert meta["source"] == "deltas" and meta["rank"] == 8
    # recompute one module's basis from the three saved adapters: top-8 left singular vectors of mean s·B·A
    key = "model.layers.1.mlp.down_proj"
    deltas = []
    for name in quality.BASIS_SOURCES:
        cfg = json.loads((work / name / "adapter_config.json").read_text())
        w = load_file(str(work / name / "adapter_model.safetensors"))
        a = w[f"base_model.model.{key}.lora_A.weight"]
        b = w[f"base_model.model.{key}.lora_B.weight"]
        assert b.abs().max() > 0, name  # the fine-tune moved B away from its zero start
        deltas.append(cfg["lora_alpha"] / cfg["r"] * b @ a)
    u = torch.linalg.svd(sum(deltas) / 3, full_matrices=False)[0][:, :8]
    got = load_file(str(basis_file))[key]
    # same subspace: the projector onto one equals the projector onto the other
    torch.testing.assert_close(got @ got.T, u @ u.T, atol=1e-4, rtol=0)


def test_rerun_skips_finished_runs(run):
    before = run["out"].read_text()
    assert quality.main(run["argv"]) == 0
    assert run["out"].read_text() == before


def test_instruction_task_scores_its_split_and_zero_shot_yelp(run, tmp_path):
    out = tmp_path / "alpaca.jsonl"
    argv = ["--task", "alpaca", "--model", run["model"], "--steps", "4", "--seeds", "0", "--lrs", "5e-3",
            "--systems", "base", "lora8", "--out", str(out)]
    assert quality.main(argv) == 0
    rows = {r["system"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"base", "lora8"} and all(r["task"] == "alpaca" for r in rows.values())
    assert set(rows["lora8"]["nll"]) == {"alpaca", "all"}
    assert set(rows["lora8"]["zero_shot_yelp"]) == {"neg2pos", "pos2neg", "all"}
    assert rows["lora8"]["nll"]["alpaca"] != rows["base"]["nll"]["alpaca"]
    assert rows["lora8"]["zero_shot_yelp"]["all"] != rows["base"]["zero_shot_yelp"]["all"]


def test_grid_is_extended_past_the_edge_that_wins():
    from types import SimpleNamespace

    args = SimpleNamespace(task="yelp", seeds=[0, 1], steps=10, lrs=[1e-3, 3e-3], systems=["lora8"])

    def rows(nlls):
        return [{"task": "yelp", "system": "lora8", "seed": 0, "steps": 10, "lr": lr, "nll": {"all": v}}
                for lr, v in nlls.items()]

    runs, resolve = quality.plan(args, rows({1e-3: 1.0}))
    assert runs == [("lora8", 1e-3, 0), ("lora8", 3e-3, 0), ("lora8", "edge", 0), ("lora8", "best", 1)]
    assert resolve("lora8", "edge") is None  # the sweep is not finished
    assert quality.plan(args, rows({1e-3: 1.0, 3e-3: 2.0}))[1]("lora8", "edge") == 3.3e-4
    assert quality.plan(args, rows({1e-3: 2.0, 3e-3: 1.0}))[1]("lora8", "edge") == 9e-3
    # the extension is part of the sweep the best lr comes from
    assert quality.plan(args, rows({1e-3: 2.0, 3e-3: 1.0, 9e-3: 0.5}))[1]("lora8", "best") == 9e-3
    args.lrs = [1e-3, 3e-3, 9e-3]
    assert quality.plan(args, rows({1e-3: 2.0, 3e-3: 1.0, 9e-3: 1.5}))[1]("lora8", "edge") is None


def test_a_probe_alone_runs_at_its_parents_best_lr():
    from types import SimpleNamespace

    args = SimpleNamespace(task="yelp", seeds=[0, 1], steps=10, lrs=[1e-3, 3e-3], systems=["salora_b0"])
    rows = [{"task": "yelp", "system": "salora", "seed": 0, "steps": 10, "lr": lr, "nll": {"all": v}}
            for lr, v in {1e-3: 2.0, 3e-3: 1.0}.items()]
    runs, resolve = quality.plan(args, rows)
    assert runs == [("salora_b0", "parent", 0), ("salora_b0", "parent", 1)]
    assert resolve("salora_b0", "parent") == 3e-3


def test_style_scores_are_added_to_the_best_runs_of_the_first_seed(run, tmp_path):
    import quality_style
    from loraforge.eval.classifier import train_style_classifier

    out = tmp_path / "style.jsonl"
    argv = ["--model", run["model"], "--steps", "4", "--seeds", "0", "--lrs", "5e-3", "--systems", "base", "lora8",
            "--out", str(out)]
    assert quality.main(argv) == 0
    # a small classifier in the scorer's folder, so the test does not pay for the benchmark's one
    yelp = quality_style.qd.DATA / "yelp"
    folder = Path(quality_style.default_folder(str(out)))
    train_style_classifier(yelp / "sentiment.dev.0", yelp / "sentiment.dev.1", "minilm", folder / "classifier",
                           max_steps=1, max_per_style=8, label_names=("negative", "positive"))
    assert quality.main(argv + ["--style"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["system"] for r in lines] == ["base", "lora8", "base", "lora8"]  # each rerun once, for its scores
    for r in lines[2:]:
        assert r["rerun_of_nll"] == pytest.approx(r["nll"]["all"], abs=1e-6)  # the rerun reproduces the run
        for d in quality_style.qd.DIRECTIONS:
            st = r["style"][d]
            assert len(st["outputs"]) == quality_style.qd.TEST_PER_DIRECTION
            assert 0 <= st["acc"] <= 100 and 0 <= st["bleu"] <= 100 and st["ppl"] > 0
    human = lines[2]["style_yardsticks"]["human"]
    assert all(human[d]["bleu"] == pytest.approx(100) for d in quality_style.qd.DIRECTIONS)  # references vs themselves
    # the report keeps the last line of a run
    import quality_report

    assert len(quality_report.load(str(out))) == 2
    before = out.read_text()
    assert quality.main(argv + ["--style"]) == 0 and out.read_text() == before
