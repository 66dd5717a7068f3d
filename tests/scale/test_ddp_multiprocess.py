"""Every method under DDP: 2 CPU processes (gloo) launched by `accelerate launch`, against one process.

One `accelerate launch --multi_gpu --num_processes 2` runs all cases (tests/scale/ddp_worker.py; on a
CPU-only machine `--multi_gpu` only selects accelerate's torchrun launcher, and the worker's
`TrainingArguments(use_cpu=True, ddp_backend="gloo")` make it DDP over gloo; `--cpu` would start one
process, as accelerate leaves multi-process CPU runs to MPI), one plain process runs the same cases
with the whole global batch, both at once. Each rank takes a per-device batch of 4, the single
process a batch of 8; both read the same seeded sampler order, and accelerate hands rank i the
batches i, i+2, ... of that order, so the union of the ranks' micro-batches at every optimizer step
is exactly the single process's batch (checked from the recorded examples, not assumed).

What must hold after 8 optimizer steps:
- every rank holds bit-identical adapter state (factors, gate logits, frozen gates, λ, window,
  Delta-LoRA snapshots, step counters) and, for in-place Delta-LoRA, bit-identical base weights:
  DDP gives every rank the same averaged gradient, and all post-step work is a deterministic
  function of identical state, so any difference is a bug (e.g. work that uses a rank's local batch);
- the DDP run equals the single-process run to atol 1e-5 + rtol 1e-4 (fp32). DDP's gradient is the
  mean of two half-batch gradients, summed in another order than the full batch's, so the two runs
  differ by float32 round-off (observed ≤ 5e-7 after 8 Adam steps at lr 1e-2); a real divergence, a
  rank training on its half only or a loss term counted per rank, moves weights by ~lr per step.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from two_ranks import free_port, load_result, run_beside

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ddp_worker.py"
CASES = ["probe", "salora", "delta_in_place", "delta_folded", "cora_fb"]
ATOL, RTOL = 1e-5, 1e-4
ADAPTED = 6  # the worker's TARGETS (q_proj, v_proj, up_proj) in each of the tiny Llama's 2 layers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(WORKER), str(out), *CASES, "sharded"]
    run_beside(launch, [sys.executable, str(WORKER), str(out), *CASES], out / "ddp.log", timeout=600)
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _initial_base():
    from loraforge import testing

    return {n: p.detach().clone() for n, p in testing.tiny_llama(seed=0).named_parameters()}


def _pick(state: dict, part: str) -> dict:
    """The entries of `state` whose name holds `part`: one per adapted module, or the test fails (a check
    over them must not pass because nothing matched)."""
    found = {k: v for k, v in state.items() if part in k}
    assert len(found) == ADAPTED, f"{part}: {len(found)} entries, expected one per adapted module ({ADAPTED})"
    return found


def _base_key(state_key: str) -> str:
    """`base_model.model.<path>.base_layer.weight` -> `<path>.weight` of the plain model."""
    return state_key[len("base_model.model."):].replace(".base_layer.weight", ".weight")


@pytest.mark.parametrize("case", CASES)
def test_ranks_agree_and_match_one_process(runs, case):
    r0, r1, one = (load_result(runs, case, tag) for tag in ("rank0", "rank1", "single"))
    assert (r0["world_size"], r1["world_size"], one["world_size"]) == (2, 2, 1)
    assert r0["steps"] == r1["steps"] == one["steps"] == 8
    for step, (a, b, c) in enumerate(zip(r0["seen"], r1["seen"], one["seen"], strict=True)):
        assert len(a) == len(b) == 4 and not set(a) & set(b), f"step {step}: ranks must see disjoint halves"
        assert sorted(a + b) == sorted(c), f"step {step}: the ranks' examples differ from the single batch"

    assert r0["state"].keys() == r1["state"].keys() == one["state"].keys()
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), f"{key} differs between ranks"
        torch.testing.assert_close(value, one["state"][key], atol=ATOL, rtol=RTOL, msg=lambda m: f"{key}: {m}")
    assert r0["logs"] == r1["logs"]
    assert r0["logs"].keys() == one["logs"].keys()
    for key, value in r0["logs"].items():
        assert value == pytest.approx(one["logs"][key], rel=RTOL, abs=ATOL), key

    # The comparison means something only if the method's own state moved during the run.
    state = r0["state"]
    pick = lambda part: _pick(state, part)  # noqa: E731
    base0 = _initial_base()
    if case == "salora":
        lam = pick(".lora_salora_lambda.")
        assert all(float(v[0]) > 0 for v in lam.values()), "λ never ascended"
        assert all(v.abs().max() > 0 for v in pick(".lora_gate_logits.").values()), "gates never trained"
        windows = pick(".lora_salora_window.").values()
        assert all(v.tolist()[:2] == [2, 6] and v.tolist()[2] != 0 for v in windows), "gates did not freeze at step 6"
        assert "salora/expected_density" in r0["logs"]
    if case.startswith("delta"):
        assert all(int(v[1]) == 2 for v in pick(".lora_delta_steps.").values()), "snapshot not taken at K=2"
        moved = [not torch.equal(v, base0[_base_key(k)]) for k, v in pick(".base_layer.weight").items()]
        assert set(moved) == {case == "delta_in_place"}  # in place writes every W; folded none
    if case == "cora_fb":
        basis = load_file(str(runs / "basis.rank0.safetensors"))
        for key, b in pick(".lora_B.default.weight").items():
            module = key[len("base_model.model."):-len(".lora_B.default.weight")]
            assert torch.equal(b, basis[module][:, :4]), f"{key}: FB's B must stay the basis"
        assert all(a.abs().max() > 0 for a in pick(".lora_A.default.weight").values())


def test_sharded_weights_train(runs):
    """FSDP2 (`fully_shard`) and FSDP1 (flat parameters, use_orig_params) on 2 gloo ranks: every method
    trains in a hand loop, on every rank, including a driver made before sharding
    (tests/scale/test_fsdp_sharded_training.py checks the results against one process)."""
    for tag in ("rank0", "rank1"):
        error = runs / f"sharded.{tag}.error"
        assert not error.exists(), error.read_text()
        outcome = json.loads((runs / f"sharded.{tag}.json").read_text())
        assert set(outcome) == {"fsdp2/delta_in_place", "fsdp2/delta_in_place+driver_before_sharding",
                                "fsdp2/delta_folded", "fsdp2/salora", "fsdp2/cora_fb", "fsdp1/delta_in_place",
                                "fsdp1/cora_fb", "fsdp1/delta_k0"}
        for key, result in outcome.items():
            assert result == {"trained": True, "step": 2}, (key, result)


class MasterCopyAdamW(torch.optim.AdamW):
    """AdamW over fp32 master copies of the parameters, written back after each step: how DeepSpeed
    ZeRO-1/2 (and other master-weight wrappers) step, so the torch optimizer never holds the
    model's own parameters and loraforge's optimizer hook cannot find the adapter."""

    def __init__(self, params, **kwargs):
        self.model_params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().float().clone().requires_grad_() for p in self.model_params]
        super().__init__(self.masters, **kwargs)

    def step(self, closure=None):
        for master, p in zip(self.masters, self.model_params):
            master.grad = None if p.grad is None else p.grad.detach().float().clone()
        out = super().step(closure)
        with torch.no_grad():
            for master, p in zip(self.masters, self.model_params):
                p.copy_(master)
        return out


def test_post_step_work_runs_when_the_optimizer_steps_master_copies(tmp_path):
    """In-place Delta-LoRA under LoraForgeTrainer with such an optimizer: W must still move, and end at
    W_0 + λ·s·(B_T A_T - B_K A_K) (the telescoped sum), with the driver at the trainer's step."""
    from peft import get_peft_model
    from transformers import TrainingArguments

    import loraforge
    from loraforge import testing

    sys.path.insert(0, str(HERE))
    from ddp_worker import random_tokens

    model = get_peft_model(testing.tiny_llama(seed=0), loraforge.DeltaLoRAConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], start_step=1, update_ratio=2.0, propagation="in_place"))
    w0 = {l.forge_name: l.get_base_layer().weight.detach().clone() for l in loraforge.driver(model).layers}
    opt = MasterCopyAdamW(model.parameters(), lr=1e-2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True)
    loraforge.LoraForgeTrainer(model=model, args=args, train_dataset=random_tokens(16), optimizers=(opt, None)).train()
    d = loraforge.driver(model)
    assert d.step == 4 and len(d.layers) == 2  # q_proj in each of the tiny Llama's 2 layers
    for layer in d.layers:
        b, a = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
        bk, ak = layer.lora_delta_BK["default"].double(), layer.lora_delta_AK["default"].double()
        expected = w0[layer.forge_name].double() + 2.0 * layer.scaling["default"] * (b @ a - bk @ ak)
        assert (b @ a - bk @ ak).abs().max() > 1e-3  # the factors moved after the snapshot
        torch.testing.assert_close(layer.get_base_layer().weight.double(), expected, atol=1e-6, rtol=1e-5)
