"""`import loraforge` changes nothing for code that uses no loraforge adapter: the same plain PEFT LoRA
run (a hand loop with AdamW, a `transformers.Trainer` run, `add_weighted_adapter`, `save_pretrained`),
each in a fresh process with a fixed seed, gives bit-identical losses, weights and saved files with and
without `import loraforge` (which installs the process-wide effects of core/integration.py)."""
from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r'''
import hashlib, json, os, sys
if sys.argv[1] == "with":
    import loraforge  # noqa: F401
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)
model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                            target_modules=["q_proj", "v_proj", "down_proj"]))
ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(1))
losses = []
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
for step in range(4):  # a hand loop: torch's optimizer step hooks run around every step
    loss = model(input_ids=ids[4 * step:4 * step + 4], labels=ids[4 * step:4 * step + 4]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item().hex())
data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
args = TrainingArguments(output_dir=sys.argv[2], per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                         save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1)
trainer = Trainer(model=model, args=args, train_dataset=data)  # transformers' DEFAULT_CALLBACKS run here
trainer.train()
losses += [float(h["loss"]).hex() for h in trainer.state.log_history if "loss" in h]
model.add_weighted_adapter(["default"], [0.5], "combined", combination_type="linear")
model.save_pretrained(os.path.join(sys.argv[2], "saved"), selected_adapters=["default", "combined"])
weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for _, p in sorted(model.named_parameters())))
files = {}
for root, _, names in os.walk(os.path.join(sys.argv[2], "saved")):
    for name in sorted(names):
        if name.endswith(".safetensors"):
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), sys.argv[2])] = hashlib.sha256(f.read()).hexdigest()
print(json.dumps({"losses": losses, "weights": weights.hexdigest(), "files": files,
                  "loraforge": "loraforge" in sys.modules, "n_loss": len(losses)}))
'''


def _run(mode: str, out) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_plain_peft_lora_is_bit_identical_with_and_without_import_loraforge(tmp_path):
    without = _run("without", tmp_path / "without")
    with_ = _run("with", tmp_path / "with")
    assert (without["loraforge"], with_["loraforge"]) == (False, True)
    assert without["n_loss"] == 7 and len(without["files"]) == 2  # 4 hand-loop steps + 3 trainer logs; 2 adapters
    assert with_["losses"] == without["losses"]
    assert with_["weights"] == without["weights"]
    assert with_["files"] == without["files"]
