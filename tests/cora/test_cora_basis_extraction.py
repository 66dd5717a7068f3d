"""CoRA basis extraction: planted subspaces recovered, effective LoRA weights, refusals, streaming."""
from __future__ import annotations

import json
import math
import os
import threading
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.linalg import subspace_angles

from loraforge import testing
from loraforge.cli import main as cli_main
from loraforge.cora import extract as extract_mod
from loraforge.cora.extract import CoRAExtractError, extract_basis
from loraforge.cora.model import basis_metadata

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def largest_angle(u: torch.Tensor, v: torch.Tensor) -> float:
    """Largest principal angle between the column spaces (scipy: an implementation independent of ours)."""
    return float(subspace_angles(u.double().numpy(), v.double().numpy()).max())


def wedin_angle(signal: torch.Tensor, noise: torch.Tensor, r: int) -> float:
    """Wedin's bound on the largest angle between the top-r left singular spaces of `signal` (rank r)
    and `signal + noise`: sin θ <= ||noise||₂ / (σ_r(signal) - ||noise||₂)."""
    e = torch.linalg.matrix_norm(noise.double(), ord=2)
    gap = torch.linalg.svdvals(signal.double())[r - 1] - e
    assert gap > e, "the planted signal must dominate the noise for the bound to say anything"
    return math.asin(float(e / gap))


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen))[0]


def plant_models(root, n_models: int, r: int, shared_per_layer: bool, sigma: float = 0.3, shards: bool = False, **cfg):
    """Save `n_models` tiny Llamas whose target weights are `U* G_m + σ N_m` with one planted `U*` per
    module (or per layer, shared by its modules); return the paths, the planted bases and the truths
    (signal and noise of the AVERAGE weight, for Wedin's bound)."""
    gen = torch.Generator().manual_seed(1234)
    models = [testing.tiny_llama(seed=m, **cfg) for m in range(n_models)]
    planted, shared, signal, noise = {}, {}, {}, {}
    for name, module in models[0].named_modules():
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        d_out, d_in = module.weight.shape
        parent = name.rsplit(".", 1)[0]
        if shared_per_layer:
            planted[name] = shared.setdefault(parent, orthonormal(d_out, r, gen))
        else:
            planted[name] = orthonormal(d_out, r, gen)
        gs = [3.0 * torch.randn(r, d_in, generator=gen) for _ in models]
        ns = [sigma * torch.randn(d_out, d_in, generator=gen) for _ in models]
        for model, g, n in zip(models, gs, ns):
            model.get_submodule(name).weight.data = planted[name] @ g + n
        signal[name] = planted[name] @ (sum(gs) / n_models)
        noise[name] = sum(ns) / n_models
    paths = []
    for m, model in enumerate(models):
        path = os.path.join(root, f"ft{m}")
        model.save_pretrained(path, max_shard_size="60KB" if shards else "1GB")
        paths.append(path)
    return paths, planted, signal, noise


def check_recovered(out, planted, signal, noise, r, groups=None):
    bases = load_file(out)
    assert set(bases) == set(planted)
    for name, u in bases.items():
        assert u.shape == (planted[name].shape[0], r)
        torch.testing.assert_close(u.T @ u, torch.eye(r), atol=1e-5, rtol=0)  # orthonormal columns
        members = groups(name) if groups else [name]
        s = torch.cat([signal[k] for k in members], dim=1)
        e = torch.cat([noise[k] for k in members], dim=1)
        bound = wedin_angle(s, e, r)
        angle = largest_angle(u, planted[name])
        assert angle <= bound + 1e-6, (name, angle, bound)
        assert bound < 0.35  # a random r-dim subspace of R^64 sits near pi/2
        random_angle = largest_angle(orthonormal(u.shape[0], r, torch.Generator().manual_seed(7)), planted[name])
        assert random_angle > 3 * bound


@pytest.mark.parametrize("shards,svd", [(False, "exact"), (True, "randomized")])
def test_planted_subspace_per_module(tmp_path, shards, svd):
    paths, planted, signal, noise = plant_models(tmp_path, 3, r=4, shared_per_layer=False, shards=shards)
    if shards:
        assert os.path.isfile(os.path.join(paths[0], "model.safetensors.index.json"))
        assert len([f for f in os.listdir(paths[0]) if f.endswith(".safetensors")]) > 2
    out = tmp_path / "basis.safetensors"
    meta = extract_basis(paths, 4, TARGETS, out, svd=svd, progress=False)
    check_recovered(out, planted, signal, noise, 4)
    assert meta == basis_metadata(out)
    assert meta["rank"] == 4 and meta["svd"] == svd and meta["group"] == "module" and meta["source"] == "weights"
    with open(os.path.join(paths[0], "config.json"), "rb") as f:
        import hashlib

        assert meta["sources"][0]["config_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert [s["name"] for s in meta["sources"]] == ["ft0", "ft1", "ft2"]


def test_planted_subspace_shared_by_layer(tmp_path):
    # Full attention heads, so q, k, v and o have equal output sizes and can be stacked.
    paths, planted, signal, noise = plant_models(tmp_path, 3, r=4, shared_per_layer=True, num_key_value_heads=4)
    out = tmp_path / "basis.safetensors"
    extract_basis(paths, 4, TARGETS, out, group="layer", progress=False)
    bases = load_file(out)
    parent = lambda name: name.rsplit(".", 1)[0]  # noqa: E731
    for name in bases:
        torch.testing.assert_close(bases[name], bases[parent(name) + ".q_proj"], rtol=0, atol=0)
    check_recovered(out, planted, signal, noise, 4, groups=lambda n: [f"{parent(n)}.{t}" for t in TARGETS])
    # Without the shared structure the per-module bases differ from the layer basis.
    per_module = tmp_path / "per_module.safetensors"
    extract_basis(paths, 4, TARGETS, per_module, progress=False)
    assert largest_angle(load_file(per_module)["model.layers.0.self_attn.k_proj"], bases["model.layers.0.self_attn.k_proj"]) > 1e-3


def _lora(base, config, gen, scale=0.5):
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = scale * torch.randn(p.shape, generator=gen)
    return model


def test_lora_adapters_match_their_merged_models(tmp_path):
    """Adapters + base must give the basis of the models PEFT itself merges from them, with per-module
    ranks and alphas and rsLoRA (different scalings per adapter matter in both sources)."""
    gen = torch.Generator().manual_seed(0)
    base_dir = testing.save_tiny_model(tmp_path / "base")
    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 6},
                   alpha_pattern={"layers.1.self_attn.q_proj": 3}),
        LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"]),
    ]
    adapters, merged = [], []
    for i, config in enumerate(configs):
        model = _lora(testing.tiny_llama(seed=0), config, gen)
        model.save_pretrained(tmp_path / f"lora{i}")
        model.merge_and_unload().save_pretrained(tmp_path / f"merged{i}")
        adapters.append(str(tmp_path / f"lora{i}"))
        merged.append(str(tmp_path / f"merged{i}"))
    for source in ("weights", "deltas"):
        a, b, c = (tmp_path / f"{source}_{k}.safetensors" for k in "abc")
        extract_basis(adapters, 2, ["q_proj", "v_proj", "o_proj"], a, base=base_dir, source=source, progress=False)
        extract_basis(merged, 2, ["q_proj", "v_proj", "o_proj"], b, base=base_dir, source=source, progress=False)
        extract_basis([merged[0], adapters[1]], 2, ["q_proj", "v_proj", "o_proj"], c, base=base_dir, source=source,
                      progress=False)
        ua, ub, uc = load_file(a), load_file(b), load_file(c)
        assert set(ua) == set(ub) == set(uc)
        for key in ua:
            assert largest_angle(ua[key], ub[key]) < 1e-3, (source, key)
            assert largest_angle(uc[key], ub[key]) < 1e-3, (source, key)
    assert basis_metadata(a)["sources"][0]["kind"] == "lora" and basis_metadata(c)["sources"][0]["kind"] == "model"


def test_planted_subspace_from_lora_deltas(tmp_path):
    """Adapters whose B lie near a planted column space: source='deltas' recovers it."""
    gen = torch.Generator().manual_seed(3)
    base_dir = testing.save_tiny_model(tmp_path / "base")
    targets, r, n_adapters, sigma = ["q_proj", "v_proj"], 3, 3, 0.02
    planted, signal, noise, paths = {}, {}, {}, []
    for i in range(n_adapters):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
        model = get_peft_model(testing.tiny_llama(seed=0), config)
        s = config.lora_alpha / r
        for layer_name, layer in model.base_model.model.named_modules():
            if not hasattr(layer, "lora_A") or "default" not in getattr(layer, "lora_A", {}):
                continue
            d_out = layer.lora_B["default"].weight.shape[0]
            u = planted.setdefault(layer_name, orthonormal(d_out, r, gen))
            rot, n = torch.randn(r, r, generator=gen), sigma * torch.randn(d_out, r, generator=gen)
            a = torch.randn(layer.lora_A["default"].weight.shape, generator=gen)
            layer.lora_A["default"].weight.data = a
            layer.lora_B["default"].weight.data = u @ rot + n
            signal[layer_name] = signal.get(layer_name, 0) + s * (u @ rot @ a) / n_adapters
            noise[layer_name] = noise.get(layer_name, 0) + s * (n @ a) / n_adapters
        model.save_pretrained(tmp_path / f"lora{i}")
        paths.append(str(tmp_path / f"lora{i}"))
    out = tmp_path / "basis.safetensors"
    extract_basis(paths, r, targets, out, base=base_dir, source="deltas", progress=False)
    check_recovered(out, planted, signal, noise, r)


# refusals ---------------------------------------------------------------------------------------


@pytest.fixture
def three_models(tmp_path):
    return [testing.save_tiny_model(tmp_path / f"m{i}", seed=i) for i in range(3)]


def _refused(tmp_path, match, models, **kw):
    out = tmp_path / "refused.safetensors"
    kw.setdefault("rank", 4)
    kw.setdefault("targets", ["q_proj", "v_proj"])
    with pytest.raises(CoRAExtractError, match=match):
        extract_basis(models, out=out, progress=False, **kw)
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


@pytest.fixture
def no_compute(monkeypatch):
    """Any weight read or decomposition fails the test: refusals must come from the headers alone."""

    def forbidden(*a, **k):
        raise AssertionError("weights were read before every input was checked")

    monkeypatch.setattr(extract_mod, "_read", forbidden)
    monkeypatch.setattr(torch.linalg, "svd", forbidden)


def test_refuses_other_architecture(tmp_path, three_models, no_compute):
    cfg_file = os.path.join(three_models[2], "config.json")
    cfg = json.load(open(cfg_file))
    cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
    json.dump(cfg, open(cfg_file, "w"))
    _refused(tmp_path, r"architectures differ: .*m0 is model_type='llama'.*m2 is model_type='mistral'", three_models)


def test_refuses_other_shape(tmp_path, three_models, no_compute):
    small = testing.save_tiny_model(tmp_path / "small", hidden=32)
    _refused(tmp_path, r"shapes differ for 'model.layers.0.self_attn.q_proj.weight': \(64, 64\) in .*m0, \(32, 32\) in .*small",
             three_models + [small])


def test_refuses_missing_key(tmp_path, three_models, no_compute):
    file = os.path.join(three_models[1], "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    _refused(tmp_path, r"m1: missing key 'model.layers.1.self_attn.v_proj.weight'", three_models)


def test_refuses_missing_key_in_a_shard(tmp_path, three_models, no_compute):
    sharded = tmp_path / "sharded"
    testing.tiny_llama(seed=5).save_pretrained(sharded, max_shard_size="60KB")
    index = json.load(open(sharded / "model.safetensors.index.json"))
    shard = sharded / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    tensors = load_file(shard)
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    _refused(tmp_path, r"missing key 'model.layers.0.self_attn.q_proj.weight'", three_models + [str(sharded)])


@pytest.mark.parametrize("sharded", [False, True])
def test_refuses_truncated_file(tmp_path, three_models, no_compute, sharded):
    target = tmp_path / "cut"
    testing.tiny_llama(seed=6).save_pretrained(target, max_shard_size="60KB" if sharded else "1GB")
    files = sorted(f for f in os.listdir(target) if f.endswith(".safetensors"))
    victim = target / files[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    _refused(tmp_path, rf"{files[-1]}: not a complete safetensors file", three_models + [str(target)])


def test_refuses_bad_options(tmp_path, three_models, no_compute):
    _refused(tmp_path, r"'x_proj' matches no 2-D weight .* module names there: .*q_proj", three_models, targets=["x_proj"])
    _refused(tmp_path, r"source='deltas' .* pass --base", three_models, source="deltas")
    _refused(tmp_path, r"rank 65 exceeds the largest possible rank 64", three_models, rank=65)
    # Grouped KV heads: k/v have 32 output features, q has 64.
    _refused(tmp_path, r"group='layer' .* needs equal output sizes", three_models, group="layer", targets=["q_proj", "k_proj"])


def test_refuses_adapter_without_base_or_of_another_shape(tmp_path, three_models, no_compute):
    get_peft_model(testing.tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    _refused(tmp_path, r"lora is a LoRA adapter: pass --base", [str(tmp_path / "lora")])
    small = testing.save_tiny_model(tmp_path / "small", hidden=32)
    _refused(tmp_path, r"shapes differ for 'model.layers.0.self_attn.q_proj'", [str(tmp_path / "lora")], base=small,
             targets=["q_proj"])


# streaming ----------------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident memory above the level at entry. tracemalloc cannot be used: it does not see
    torch's CPU allocations (checked: loading a 16 MB tensor shows ~11 kB traced). Uses the kernel's
    own high-water mark (VmHWM, reset through /proc/self/clear_refs) where allowed, else samples VmRSS."""

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def __enter__(self):
        self.start = self._status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.sampler = None
        except OSError:
            self.samples, self.stop = [self.start], threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.samples.append(self._status("VmRSS"))
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.sampler is None:
            self.peak = self._status("VmHWM") - self.start
        else:
            self.stop.set()
            self.sampler.join()
            self.peak = max(self.samples) - self.start


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_streaming_keeps_peak_memory_at_a_few_matrices(tmp_path):
    # Wide matrices keep the SVDs cheap; the point is how much of the inputs is held at once.
    n_models, n_layers, shape = 4, 12, (64, 4096)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    paths = []
    for m in range(n_models):
        path = tmp_path / f"big{m}"
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        tensors = {f"model.layers.{i}.self_attn.{t}.weight": torch.randn(shape).half()
                   for i in range(n_layers) for t in TARGETS}
        save_file(tensors, path / "model.safetensors")
        paths.append(str(path))
        del tensors
    input_bytes = n_models * n_layers * len(TARGETS) * shape[0] * shape[1] * 2
    matrix = shape[0] * shape[1] * 4  # one float32 matrix: 1 MiB
    out = tmp_path / "basis.safetensors"
    extract_basis(paths[:1], 8, TARGETS, out, progress=False)  # first run: libraries and thread pools settle
    with PeakRSS() as mem:
        extract_basis(paths, 8, TARGETS, out, progress=False)
    # Holding all inputs takes 96 MiB (192 MiB as float32); holding one model at a time 24 MiB.
    assert mem.peak < 12 * matrix, f"peak {mem.peak / 2**20:.1f} MiB for {input_bytes / 2**20:.0f} MiB of inputs"
    assert 12 * matrix < input_bytes / n_models
    assert len(load_file(out)) == n_layers * len(TARGETS)


# CLI ----------------------------------------------------------------------------------------------


def test_cli(tmp_path, three_models, capsys):
    out = tmp_path / "cli.safetensors"
    rc = cli_main(["cora-extract", "--models", *three_models, "--rank", "4", "--targets", "q_proj,v_proj",
                   "--out", str(out), "--svd", "randomized", "--group", "module"])
    assert rc == 0 and "wrote 4 bases of rank 4 from 3 inputs" in capsys.readouterr().out
    meta = basis_metadata(out)
    assert meta["svd"] == "randomized" and meta["targets"] == ["q_proj", "v_proj"] and meta["niter"] == 4
    with safe_open(str(out), "pt") as f:
        assert sorted(f.keys())[0] == "model.layers.0.self_attn.q_proj"
    rc = cli_main(["cora-extract", "--models", *three_models, "--rank", "4", "--targets", "q_proj",
                   "--out", str(tmp_path / "no.safetensors"), "--source", "deltas"])
    assert rc == 2 and "pass --base" in capsys.readouterr().err and not (tmp_path / "no.safetensors").exists()
