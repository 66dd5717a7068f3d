"""Checks of a command's arguments that need no model, run before anything imports torch.

A top-level module beside `loraforge_cli` for the same reason: importing any part of the
`loraforge` package imports torch, transformers and PEFT (seconds), and a misspelled key or a
folder without `config.json` should be answered at once. The commands run the same checks again
with the real classes (so nothing here is the only guard), and every check that cannot decide
without a library's classes (a source layout it does not recognise) passes the question on.

Misspellings get "did you mean" from `difflib.get_close_matches`. The field names of a config
dataclass are read from its source with `ast` (PEFT's LoraConfig, TRL's SFTConfig and the classes
they extend); tests check them against `dataclasses.fields` of the imported classes.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from pathlib import Path

# Classes with no dataclass fields that a config class extends (their source is not followed).
NO_FIELDS = {"object", "PushToHubMixin", "ExplicitEnum", "Enum"}
# Classes a package exports lazily (no import statement to follow): where they are defined.
LAZY_EXPORTS = {"TrainingArguments": ("transformers.training_args", "TrainingArguments")}
# The top-level keys of a `loraforge train` YAML (loraforge.train.TOP_KEYS; a test keeps both equal).
TRAIN_TOP_KEYS = {"model", "dtype", "load_in_4bit", "load_in_8bit", "data", "eval_data", "max_length", "adapter",
                  "training"}
# Where each adapter method's config class is defined, inside the loraforge package.
METHOD_CONFIGS = {"salora": ("salora/config.py", "SaLoRAConfig"),
                  "delta_lora": ("delta_lora/config.py", "DeltaLoRAConfig"),
                  "cora": ("cora/config.py", "CoRAConfig")}


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_keys(where: str, unknown, allowed, fix: str) -> str:
    """The one-line message for keys not in `allowed`, each with its closest allowed key."""
    named = ", ".join(f"{k!r}{did_you_mean(k, allowed)}" for k in sorted(map(str, unknown)))
    return f"{where}: unknown key(s) {named}; {fix}"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # a top-level name: located, not imported
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def _module_file(module: str, level: int, here: Path) -> Path | None:
    if level:
        base = here.parent
        for _ in range(level - 1):
            base = base.parent
        parts = module.split(".") if module else []
    else:
        top, *parts = module.split(".")
        base = _package_dir(top)
        if base is None:
            return None
    target = base.joinpath(*parts)
    for candidate in (target.with_suffix(".py"), target / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def source_fields(path: Path, class_name: str, _seen=None) -> set[str] | None:
    """Init field names of dataclass `class_name` defined in `path`, following its bases through
    the file's imports; None when any base cannot be found (the caller then skips its check)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    imports = {alias.asname or alias.name: (node.module or "", node.level, alias.name)
               for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    def follow(name: str) -> set[str] | None:
        if name in imports:  # defined elsewhere, or re-exported by a package's __init__
            module, level, original = imports[name]
            file = _module_file(module, level, path)
        elif name in LAZY_EXPORTS:
            module, original = LAZY_EXPORTS[name]
            file = _module_file(module, 0, path)
        else:
            return None
        return source_fields(file, original) if file is not None else None

    node = classes.get(class_name)
    if node is None:
        return follow(class_name)
    fields: set[str] = set()
    for base in node.bases:
        name = base.id if isinstance(base, ast.Name) else None
        if name in NO_FIELDS:
            continue
        inherited = source_fields(path, name) if name in classes else follow(name) if name else None
        if inherited is None:
            return None
        fields |= inherited
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if "ClassVar" in ast.unparse(stmt.annotation) or _init_false(stmt.value):
                continue
            fields.add(stmt.target.id)
    return fields


def _init_false(value) -> bool:
    return (isinstance(value, ast.Call) and any(k.arg == "init" and isinstance(k.value, ast.Constant)
                                                 and k.value.value is False for k in value.keywords))


def sft_config_fields() -> set[str] | None:
    """Field names of `trl.SFTConfig` (None: TRL's source layout is not recognised)."""
    trl = _package_dir("trl")
    return source_fields(trl / "trainer" / "sft_config.py", "SFTConfig") if trl else None


def adapter_fields(method: str) -> set[str] | None:
    """Field names of the config class of `method` (None: unknown method or source layout)."""
    here = _package_dir("loraforge")
    if method not in METHOD_CONFIGS or here is None:
        return None
    file, cls = METHOD_CONFIGS[method]
    return source_fields(here / file, cls)


def check_train_config(cfg: dict, top_keys) -> list[str]:
    """The YAML job's mistakes that need no model, one message each (the first is reported)."""
    problems = []
    unknown = set(cfg) - set(top_keys)
    if unknown:
        problems.append(unknown_keys("config", unknown, top_keys, f"the top-level keys are {sorted(top_keys)}"))
    adapter = cfg.get("adapter")
    if isinstance(adapter, dict) and adapter.get("method") in METHOD_CONFIGS:
        fields = adapter_fields(adapter["method"])
        wrong = set(adapter) - {"method"} - (fields or set())
        if fields is not None and wrong:
            cls = METHOD_CONFIGS[adapter["method"]][1]
            problems.append(unknown_keys("adapter", wrong, fields, f"they must be fields of {cls}"))
    # a method not listed here may be registered by another package: the command decides
    training = cfg.get("training")
    if isinstance(training, dict):
        fields = sft_config_fields()
        wrong = set(training) - (fields or set())
        if fields is not None and wrong:
            problems.append(unknown_keys("training", wrong, fields, "they must be fields of trl.SFTConfig"))
    return problems


def check_model_folder(path: str, flag: str, what: str) -> str | None:
    """A local model folder must hold config.json (None: fine)."""
    if not os.path.isdir(path):
        return f"{flag}: no folder {path!r}; pass the local folder of {what}"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return (f"{flag}: {path} holds no config.json, so it is not a transformers model folder; pass the folder "
                f"written by save_pretrained for {what}")
    return None


def _safetensors_shapes(folder: str, name: str) -> dict[str, list[int]] | None:
    """{tensor name: shape} from a safetensors file's header (or a sharded index's files); None if absent."""
    index = os.path.join(folder, name + ".index.json")
    files = [os.path.join(folder, name)]
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
    shapes = {}
    for file in files:
        if not os.path.isfile(file):
            return None
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def check_adapter_fits(adapter: str, model: str) -> str | None:
    """An adapter must have been trained on a base with the same module shapes (None: fits, or
    cannot tell without loading, e.g. weights not in safetensors)."""
    theirs = _safetensors_shapes(adapter, "adapter_model.safetensors")
    ours = _safetensors_shapes(model, "model.safetensors")
    if theirs is None or ours is None:
        return None
    recorded = None
    config = os.path.join(adapter, "adapter_config.json")
    if os.path.isfile(config):
        with open(config) as f:
            recorded = json.load(f).get("base_model_name_or_path")
    fix = (f"pass the model it was trained on with --model (its adapter_config.json names {recorded!r})"
           if recorded else "pass the model it was trained on with --model")
    for key, shape in sorted(theirs.items()):
        for part, axis in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not key.endswith(part):
                continue
            module = key[:-len(part)].removeprefix("base_model.model.")
            weight = ours.get(module + ".weight")
            if weight is None:
                return f"--adapter: {adapter} adapts {module}, which {model} does not have; {fix}"
            if shape[axis] != weight[axis]:  # lora_A is (r, in), lora_B (out, r), the base weight (out, in)
                return (f"--adapter: {adapter} was trained on another base ({module} has "
                        f"{'inputs' if axis else 'outputs'} of size {shape[axis]} there, {weight[axis]} in "
                        f"{model}); {fix}")
    return None


def check_empty_out(path: str, overwrite: bool, flag: str = "--out") -> str | None:
    """An output folder that already holds files is only written into with --overwrite."""
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        return (f"{flag}: {path} is not empty; pass an empty or new folder, or add --overwrite to replace "
                "the adapter files in it")
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{flag}: {path} is a file; pass a folder"
    return None


def _train(a) -> str | None:
    if a.max_steps is not None and a.max_steps <= 0:
        return (f"--max-steps: {a.max_steps} is not a number of optimizer steps; give N >= 1, or leave the flag "
                "out to use training.max_steps of the YAML")
    if a.config is None:
        return None
    import yaml  # light: no torch

    try:
        cfg = yaml.safe_load(Path(a.config).read_text(encoding="utf-8"))
    except OSError:
        return None  # the command reports it
    except yaml.YAMLError as exc:
        return yaml_error(a.config, exc)
    problems = check_train_config(cfg, TRAIN_TOP_KEYS) if isinstance(cfg, dict) else []
    return problems[0] if problems else None


def yaml_error(path: str, exc) -> str:
    """One line for a YAML syntax error: where it is and what to check."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return (f"{path}: YAML syntax error{where}: {problem}; check the indentation and that every `key: value` "
            "has its colon and closed quotes")


def _eval_style(a) -> str | None:
    if (a.model and a.hypotheses) or (a.adapter and not a.model):
        return None  # the command names the conflict
    problem = a.model and check_model_folder(a.model, "--model", "the base model that generates the rewrites")
    if not problem and a.adapter:
        problem = _adapter_folder(a.adapter)
        if not problem and a.model:
            problem = check_adapter_fits(a.adapter, a.model)
    if not problem and a.classifier:
        problem = check_model_folder(a.classifier, "--classifier", "a classifier from `loraforge "
                                     "train-style-classifier`")
    return problem or None


def _adapter_folder(path: str) -> str | None:
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return (f"--adapter: {path} holds no adapter_config.json; pass the output_dir of a training run "
                "(or a folder written by save_pretrained)")
    return None


def _classifier(a) -> str | None:
    if len(a.names.split(",")) != 2:
        return f"--names needs two comma-separated names, got {a.names!r}"
    if a.base == "minilm":
        return None
    return check_model_folder(a.base, "--base", "a BERT-like model (or `minilm`)")


def _export(a) -> str | None:
    return check_empty_out(a.out, a.overwrite)


CHECKS = {"train": _train, "eval-style": _eval_style, "train-style-classifier": _classifier, "export": _export}


def command_problem(name: str, args) -> str | None:
    """The first mistake in the parsed arguments of command `name` that needs no model (None: none found)."""
    check = CHECKS.get(name)
    return check(args) if check else None
