"""The library functions core/integration.py replaces are the ones it was written against, and the
private internals loraforge reads still exist: a new library version that changes one fails here,
loudly, instead of silently changing what the wrappers do."""
from __future__ import annotations

import hashlib
import importlib
import inspect

import pytest
import torch
import transformers.trainer

import loraforge  # noqa: F401  (installs the effects)
from loraforge.core import integration
from loraforge.core.trainer import PlanCallback


def _attribute(module: str, path: str):
    owner = importlib.import_module(module)
    for part in path.split("."):
        owner = getattr(owner, part)
    return owner


@pytest.mark.parametrize("module, path", list(integration.PATCHES))
def test_patched_function_is_unchanged_upstream(module, path):
    original = integration.original(module, path)
    digest = hashlib.sha256(inspect.getsource(original).encode()).hexdigest()
    import peft

    assert digest == integration.PATCHES[(module, path)], (
        f"{module}.{path} changed upstream (peft {peft.__version__}): re-read it, check loraforge's wrapper in "
        "core/integration.py still does what its docstring says, then record the new sha256 in PATCHES")
    installed = _attribute(module, path)
    assert installed is not original and installed.__wrapped__ is original
    assert inspect.signature(installed) == inspect.signature(original)


def test_install_is_idempotent_and_registers_each_effect_once():
    integration.install()
    assert transformers.trainer.DEFAULT_CALLBACKS.count(PlanCallback) == 1
    assert len(integration._INSTALLED) == 2  # the optimizer pre- and post-step hooks
    for module, path in integration.PATCHES:
        assert _attribute(module, path).__wrapped__ is integration.original(module, path)


def test_saved_types_are_in_peft_config_table():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for method in loraforge.methods().values():
        assert PEFT_TYPE_TO_CONFIG_MAPPING[method.config.saved_peft_type()] is method.config


def test_private_internals_read_still_exist():
    from peft.tuners.lora import model as lora_model
    from torch.distributed.fsdp import _flat_param
    from torch.distributed.tensor import _utils

    assert callable(lora_model._freeze_adapter)
    assert callable(_utils.compute_local_shape_and_global_offset)
    assert callable(torch._C._current_graph_task_id)
    flat_source = inspect.getsource(_flat_param)
    for name in ("_params", "_shard_param_infos", "_shapes", "_sharded_size", "_unpadded_unsharded_size",
                 "intra_param_start_idx", "numel_in_shard", "in_shard"):
        assert name in flat_source, f"FSDP1's FlatParameter no longer has {name} (core/sharding.py reads it)"
    bnb_modules = pytest.importorskip("bitsandbytes.nn.modules")
    assert callable(bnb_modules._convert_weight_packed_for_cpu_inverse)
    assert "support_avx512bf16_for_cpu" in inspect.getsource(bnb_modules.Linear4bit)
