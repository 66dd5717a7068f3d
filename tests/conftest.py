"""Fixtures shared by all tests: tiny offline models, tokenizer and data (see loraforge.testing)."""
from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

# Tiny models are dominated by per-op overhead; one thread avoids OpenMP contention between the
# test process and the 2-process DDP workers on a 2-core machine.
torch.set_num_threads(1)

import loraforge  # noqa: E402,F401  (registers configs and hooks before any test builds a model)
from loraforge import testing  # noqa: E402

@pytest.fixture
def tiny_model():
    return testing.tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return testing.tiny_tokenizer()


@pytest.fixture(scope="session")
def alpaca_records():
    return testing.alpaca_records()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return testing.save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def lm_dataset(tiny_tokenizer, alpaca_records):
    """A tokenised causal-LM dataset (input_ids / labels) of 64 Alpaca records (128 tokens: the
    Alpaca header alone is about 60 tokens of the tiny tokenizer)."""
    return testing.lm_dataset(tiny_tokenizer, alpaca_records[:64])


@pytest.fixture
def gloo_world_of_one():
    """A one-process gloo group, for code that looks at torch.distributed (DDP, fully_shard) in-process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
