"""The methods loraforge knows: each method's folder registers itself here with one call.

A method is a folder (a package, in or outside loraforge) holding its config (a `ForgeConfig`
subclass naming its axes and controllers), its axes, its controllers, and one call:

    register_method(SaLoRAConfig, title="SaLoRA", example="{target_density: 0.5}", commands=("ranks",))

Everything that lists methods reads this registry: `loraforge train`'s `adapter.method`, the
Axolotl schema (`adapter: <name>` and the `<name>:` block), PEFT's loader (the saved type string),
and the public names `loraforge` exports. The core never names a method.

The `loraforge` console script lists method commands without importing torch, so it reads each
method folder's `commands.py` (argument parsers only) directly; `Method.commands` names them here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .core import integration
from .core.config import ForgeConfig


@dataclass(frozen=True)
class Method:
    """One registered method.

    Args:
        name (`str`): the name in YAML / CLI / Axolotl (`adapter: <name>`), the config's `method`.
        config (`type[ForgeConfig]`): its config class.
        title (`str`): how messages and help write it, e.g. "Delta-LoRA".
        example (`str`): a short example of its YAML block, for the Axolotl schema's help.
        commands (`tuple[str, ...]`): its `loraforge` subcommands (declared in its folder's `commands.py`).
        exports (`dict[str, object]`): the names `import loraforge` makes public for it (its config class).
        report (`Callable[[Path], list[str]]`, *optional*): the lines `loraforge train` prints about the files
            a run of the method left in its output folder.
    """

    name: str
    config: type
    title: str
    example: str = ""
    commands: tuple[str, ...] = ()
    exports: dict = field(default_factory=dict)
    report: Optional[Callable] = None


_METHODS: dict[str, Method] = {}


def register_method(config: type, *, title: str | None = None, example: str = "", commands: tuple[str, ...] = (),
                    exports: dict | None = None, report: Optional[Callable] = None) -> Method:
    """Register a method: its config class (which names its axes and controllers) and its names.

    Args:
        config (`type[ForgeConfig]`): the method's config class; `config.method` is its name.
        title (`str`, *optional*): how messages write it (default: the name).
        example (`str`, *optional*): a short YAML example of its block (Axolotl's schema help).
        commands (`tuple[str, ...]`, *optional*): its `loraforge` subcommands.
        exports (`dict`, *optional*): public names for `loraforge.<name>` (default: the config class).
        report (`Callable[[Path], list[str]]`, *optional*): lines about a run's files for `loraforge train`.

    Returns:
        `Method`: the registered method. Registering the same config class again returns the first record unchanged.

    Example:

        ```py
        >>> @dataclass
        ... class ScaleConfig(loraforge.ForgeConfig):
        ...     method = "scale"
        ...     def axes(self): return [ScaleAxis]
        ...     def controllers(self): return [ScaleController]
        >>> loraforge.register_method(ScaleConfig, title="Scale")
        ```
    """
    if not (isinstance(config, type) and issubclass(config, ForgeConfig)) or not config.method:
        raise TypeError(f"register_method: {config!r} is not a ForgeConfig subclass with a `method` name")
    known = _METHODS.get(config.method)
    if known is not None and known.config is config:
        return known
    if known is not None:
        raise ValueError(f"register_method: the name {config.method!r} is taken by {known.config.__name__}")
    method = Method(config.method, config, title or config.method, example, tuple(commands),
                    dict(exports if exports is not None else {config.__name__: config}), report)
    _METHODS[config.method] = method
    integration.register_peft_type(config)
    return method


def methods() -> dict[str, Method]:
    """Every registered method by name, in registration order."""
    return dict(_METHODS)


def config_class(name: str) -> type:
    """The config class of the method called `name` (KeyError when none is registered)."""
    return _METHODS[name].config


def method_of(config) -> Method | None:
    """The registered method of a config object or class (None for a plain `LoraConfig`)."""
    cls = config if isinstance(config, type) else type(config)
    return next((m for m in _METHODS.values() if m.config is cls), None)


def register_config(config: type) -> type:
    """`register_method(config)` for a config that needs no names beyond its own; returns the class."""
    register_method(config)
    return config
