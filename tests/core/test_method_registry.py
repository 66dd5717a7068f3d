"""The registry is what everything that lists methods reads: the shipped methods are registered once
each, their folders' CLI commands are the ones the console script offers, and their public names are
`loraforge`'s."""
from __future__ import annotations

import importlib

import loraforge_cli

import loraforge


def test_the_shipped_methods_are_registered():
    found = loraforge.methods()
    assert {"salora", "delta_lora", "cora"} <= set(found)
    for name, method in found.items():
        assert method.config.method == name and loraforge.registry.config_class(name) is method.config


def test_each_method_folder_declares_the_commands_it_registers():
    shipped = {name: m for name, m in loraforge.methods().items() if m.config.__module__.startswith("loraforge.")}
    for name, method in shipped.items():
        folder = method.config.__module__.rsplit(".", 1)[0]
        declared = tuple(loraforge_cli.METHOD_COMMANDS[name].COMMANDS) if name in loraforge_cli.METHOD_COMMANDS else ()
        assert declared == method.commands, name
        for command in declared:
            module, func = loraforge_cli.COMMANDS[command][:2]
            assert module.startswith(folder) and callable(getattr(importlib.import_module(module), func))
    assert {c for m in shipped.values() for c in m.commands} == {"ranks", "cora-extract"}


def test_public_names_come_from_the_registry():
    for method in loraforge.methods().values():
        for public, obj in method.exports.items():
            if method.config.__module__.startswith("loraforge."):
                assert getattr(loraforge, public) is obj and public in loraforge.__all__
