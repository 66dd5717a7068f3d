"""SaLoRA and Delta-LoRA sharded by FSDP2 (`fully_shard`) and FSDP1 (FULL_SHARD; SHARD_GRAD_OP for
SaLoRA and in-place Delta-LoRA) on 2 gloo ranks.

One `torch.distributed.run --nproc_per_node 2` runs every case (tests/scale/fsdp_worker.py), one plain
process trains the same cases unsharded on the whole global batch of 8, both at once; HSDP (FSDP2 on a
2 × 2 mesh) and FSDP1's HYBRID_SHARD run on 4 ranks. What must hold after 8 AdamW steps (SaLoRA's
window 2..6 inside the run, the paper's budget rule (the default); Delta-LoRA's K = 2) and after 64 steps
of `SaLoRAConfig` with its default window and the "schedule" budget control (window 13..32):
- both ranks hold bit-identical whole adapter state (factors, gate logits, frozen gates, λ, window,
  snapshots, step counters; the in-place base weights gathered) and logged the same values (density,
  λ, orthogonal term, W's shift) after every step: all post-step work reads whole tensors;
- the sharded run equals the single process to 1e-5: the engines average two half-batch gradients
  (float32 round-off, observed ≤ 2.4e-6), a loss term counted per rank or read from a shard, a gate
  stepped outside the window or W updated from the wrong rows moves weights by ~lr = 1e-2 per step;
- the schedule control ends its window with C at b ± 0.02 (b = 0.5);
- what a method reads whole costs one collective a step: the loss terms read A, B (and the paper's
  logits) in one call (FSDP2; FSDP1 reads what the forward kept, no collective), the schedule control
  and in-place Delta-LoRA gather once after the step;
- a run checkpointed after step 4 (model and optimizer, sharded DCP or full state dicts) and
  resumed in a fresh model ends where the uninterrupted run ends.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from two_ranks import free_port, load_result, run_beside

HERE = Path(__file__).resolve().parent
WORKER = HERE / "fsdp_worker.py"
CASES = ["salora", "delta_in_place", "delta_folded"]
GATHER_SHAPES = [(5, 3), (1,), (7,), (2, 4)]  # the worker's run_gathers
DEFAULT_STEPS, DEFAULT_WINDOW = 64, (13, 32)  # the worker's "salora_schedule" run: window 0.2-0.5 of 64 steps
# The ranks reduce gradients in another order than one process does, and Adam divides each entry by its own
# magnitude, so that float32 noise moves an entry with a small gradient by a small share of a step (lr 1e-2):
# 1.7e-5 seen on one CPU after 8 steps (0.2% of one step). A wrong update would be off by a whole step.
TOL = 5e-5
ADAPTED = 6  # the workers' TARGETS (q_proj, v_proj, up_proj) in each of the tiny Llama's 2 layers


def _pick(state: dict, part: str) -> list:
    """The entries of `state` whose name holds `part`: one per adapted module, or the test fails (a check
    over them must not pass because nothing matched)."""
    found = [v for k, v in state.items() if part in k]
    assert len(found) == ADAPTED, f"{part}: {len(found)} entries, expected one per adapted module ({ADAPTED})"
    return found


def _launch(tmp_path_factory, ranks: int, mode: str):
    out = tmp_path_factory.mktemp(f"fsdp-{mode}")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
              str(free_port()), str(WORKER), str(out), mode]
    run_beside(launch, [sys.executable, str(WORKER), str(out), "single"], out / "fsdp.log", timeout=900)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = _launch(tmp_path_factory, 2, "sharded")
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def hybrid_runs(tmp_path_factory):
    out = _launch(tmp_path_factory, 4, "hybrid")
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _tolerance(case: str, key: str) -> float:
    # Over the window's last quarter the schedule control scales the logits' distances from the ĝ > 0 threshold
    # by SHARPEN (20): the float32 noise of the ranks' reduction order in them grows by as much (2.2e-4 seen,
    # on logits of magnitude up to ~22). A per-shard μ or a lost move is off by ~0.1-1 logit units.
    from loraforge.salora.budget import SHARPEN

    return TOL * SHARPEN if case == "salora_schedule" and ".lora_gate_logits." in key else TOL


def _check(runs, name: str, case: str, ranks: int = 2) -> dict:
    results = [load_result(runs, name, f"rank{i}") for i in range(ranks)]
    r0 = results[0]
    one = load_result(runs, f"single-{case}", "single")
    assert {r["steps"] for r in results} == {one["steps"]} == {DEFAULT_STEPS if case == "salora_schedule" else 8}
    assert all(r["state"].keys() == one["state"].keys() for r in results)
    for key, value in r0["state"].items():
        assert all(torch.equal(value, r["state"][key]) for r in results), f"{key} differs between ranks"
        torch.testing.assert_close(value, one["state"][key], atol=_tolerance(case, key), rtol=0,
                                   msg=lambda m: f"{key}: {m}")
    assert all(r["logs"] == r0["logs"] for r in results), "the ranks logged different values"
    for step, (mine, ref) in enumerate(zip(r0["logs"], one["logs"], strict=True)):
        for key, value in ref.items():
            assert mine[key] == pytest.approx(value, abs=TOL), f"step {step + 1}: {key}"
    return r0


@pytest.mark.parametrize("engine, case", [(e, c) for e in ("fsdp2", "fsdp1") for c in [*CASES, "salora_schedule"]] + [
    ("fsdp1_grad_op", "salora"), ("fsdp1_grad_op", "delta_in_place"), ("fsdp1_grad_op", "salora_schedule")])
def test_sharded_training_equals_one_process(runs, engine, case):
    r0 = _check(runs, f"{engine}-{case}", case)
    # The comparison means something only if the method's own state moved during the run.
    state, logs = r0["state"], r0["logs"]
    pick = lambda part: _pick(state, part)  # noqa: E731
    loss_reads = [log["collectives/loss"] for log in logs]
    assert set(loss_reads) == ({1} if engine == "fsdp2" and case.startswith("salora") else {0}), loss_reads
    if case == "salora_schedule":
        _check_default_salora(state, logs, engine)
    elif case == "salora":
        assert all(float(v[0]) > 0 for v in pick(".lora_salora_lambda.")), "λ never ascended"
        assert all(v.tolist()[:2] == [2, 6] and v.tolist()[2] != 0 for v in pick(".lora_salora_window.")), "no freeze"
        assert logs[1]["salora/expected_density"] != logs[5]["salora/expected_density"], "gates never trained"
        assert logs[6]["salora/expected_density"] == logs[7]["salora/expected_density"], "gates moved after freezing"
    else:
        k = 2
        assert all(v.tolist() == [k, k] for v in pick(".lora_delta_steps.")), f"snapshot not taken at K={k}"
        assert logs[-1]["delta_lora/w_shift_norm"] > 0.1
        # After K the in-place writes read A and B of every layer in one collective; folded reads nothing.
        added = {log["collectives/step"] - logs[0]["collectives/step"] for log in logs[k:]}
        assert added == ({1} if case == "delta_in_place" else {0}), added


def _check_default_salora(state: dict, logs: list, engine: str) -> None:
    start, end = DEFAULT_WINDOW
    assert all(v.tolist() == [start, end, 2] for v in _pick(state, ".lora_salora_window.")), "not frozen ('exact')"
    c = [log["salora/expected_density"] for log in logs]
    assert c[start - 1] == pytest.approx(1 / (1 + 1 / 11), abs=1e-6), "gates moved before the window"
    assert abs(c[end - 1] - 0.5) <= 0.02, f"C = {c[end - 1]:.4f} at the window's end, b = 0.5"
    assert c[end - 1] == c[-1], "gates moved after freezing"
    # The schedule control adds one collective to each step inside the window (all logits, gathered once).
    outside = logs[0]["collectives/step"]
    assert {log["collectives/step"] - outside for log in logs[start:end - 1]} == {1}
    assert {log["collectives/step"] for log in logs[end:]} == {outside}


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
def test_one_all_gather_reads_many_unevenly_sharded_tensors(runs, engine):
    """Odd shapes (rows not divisible by the ranks, a rank holding nothing of a tensor): the gathered values are
    the known ones, one collective per call (FSDP1: one more the first time, the shards' layout), and FSDP2's
    differentiable read hands each shard its rows of the gradient."""
    results = [load_result(runs, f"{engine}-gathers", f"rank{i}") for i in range(2)]
    known = [torch.arange(float(torch.Size(s).numel())).view(s) + 100 * k for k, s in enumerate(GATHER_SHAPES)]
    for r in results:
        assert r["held"] == [engine] * len(known)  # every tensor is sharded: the check is not vacuous
        for got in (r["first"], r["again"]):
            assert all(torch.equal(g, w) for g, w in zip(got, known, strict=True))
        assert (r["collectives/first"], r["collectives/again"]) == ((1, 1) if engine == "fsdp2" else (2, 1))
        if engine == "fsdp2":
            assert r["collectives/whole"] == 1
            assert all(torch.equal(g, 2 * (k + 1) * w) for k, (g, w) in enumerate(zip(r["grads"], known, strict=True)))


@pytest.mark.parametrize("engine, case", [(e, c) for e in ("fsdp2_hsdp", "fsdp1_hybrid")
                                          for c in ("salora_schedule", "delta_in_place")])
def test_hybrid_sharding_on_four_ranks_equals_one_process(hybrid_runs, engine, case):
    """2 replicas of a 2-way sharding (FSDP2 on a 2 × 2 mesh, FSDP1 HYBRID_SHARD): gathers read each
    element from one of the ranks that hold it, and the sharded writes land on every replica."""
    logs = _check(hybrid_runs, f"{engine}-{case}", case, ranks=4)["logs"]
    if case == "salora_schedule":
        c = logs[DEFAULT_WINDOW[1] - 1]["salora/expected_density"]
        assert abs(c - 0.5) <= 0.02, f"C = {c:.4f} at the window's end, b = 0.5"
    else:
        assert logs[-1]["delta_lora/w_shift_norm"] > 0.1


@pytest.mark.parametrize("engine, case, kind", [("fsdp2", case, "resume") for case in CASES] + [
    ("fsdp2", "salora", "resume-full"), ("fsdp1", "salora", "resume"), ("fsdp1", "delta_in_place", "resume-full")])
def test_resume_from_fsdp_checkpoint_equals_uninterrupted_run(runs, engine, case, kind):
    _check(runs, f"{engine}-{case}-{kind}", case)


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
@pytest.mark.parametrize("case", CASES)
def test_adapter_saved_under_fsdp_loads_and_exports_in_one_process(runs, engine, case, tmp_path):
    """The adapter written from the sharded run (the full state dict, as trainer.save_model() writes
    it under FSDP) loads onto the ORIGINAL base in one process with the trained state (in place:
    W_0 + D rebuilt on load equals the trained W), and `export_lora` writes a stock PEFT adapter
    that computes the same function."""
    from peft import PeftModel

    import loraforge
    from loraforge import testing

    one = load_result(runs, f"single-{case}", "single")["state"]
    model = loraforge.load_adapter(testing.tiny_llama(seed=0), str(runs / f"adapter-{engine}-{case}"))
    loaded = {k: v for k, v in [*model.named_parameters(), *model.named_buffers()] if ".lora_" in k}
    if case == "delta_in_place":
        loaded.update({k: v for k, v in model.named_parameters() if k.endswith("base_layer.weight") and
                       k in one})
    assert loaded.keys() == one.keys()
    for key, value in one.items():
        torch.testing.assert_close(loaded[key].detach(), value, atol=TOL, rtol=0, msg=lambda m: f"{key}: {m}")
    model.eval()
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loraforge.export_lora(model, str(tmp_path / "stock"))
    stock = PeftModel.from_pretrained(testing.tiny_llama(seed=0), str(tmp_path / "stock")).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
