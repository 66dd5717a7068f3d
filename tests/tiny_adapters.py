"""What the tests of PEFT operations on loraforge adapters share: the targets of the tiny Llama, one
input batch, a hand training loop, the adapted layers, the outputs and one tolerance."""
from __future__ import annotations

import torch

import loraforge
from loraforge.core.layer import ForgeLinear

TARGETS = ["q_proj", "v_proj", "up_proj"]
X = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(5))


def train(model, steps: int, max_steps: int, seed: int = 0) -> None:
    """A hand loop driven as the README says: begin, the driver's loss term and param groups."""
    d = loraforge.driver(model).begin(max_steps)
    special = d.param_groups(1e-2, 0.0)
    taken = {id(p) for g in special for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    opt = torch.optim.AdamW([{"params": rest}, *special], lr=3e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, 500, (4, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        reg = d.regularization_loss()
        (loss if reg is None else loss + reg).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=X).logits


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


def forge_layers(model):
    return [m for m in model.modules() if isinstance(m, ForgeLinear)]
