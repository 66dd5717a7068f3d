"""`loraforge ... --help`: no torch / PEFT import, every option explained with its default, the YAML
keys of `train` listed; the choices the parsers repeat agree with the modules that own them."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import loraforge_cli
from loraforge_cli import COMMANDS, build_parser


def test_help_imports_neither_torch_nor_peft():
    code = (
        "import sys, contextlib, io, loraforge_cli\n"
        "for name in [None, *loraforge_cli.COMMANDS]:\n"
        "    argv = ['--help'] if name is None else [name, '--help']\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: loraforge_cli.main(argv)\n"
        "        except SystemExit as e: assert e.code == 0, (name, e.code)\n"
        "print(sorted(m for m in ('torch', 'peft', 'transformers', 'trl', 'loraforge') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_has_a_help_line_and_a_default(name):
    parser = build_parser(name)
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.dest}: no help"
        if action.option_strings and not action.required and not isinstance(action, argparse._StoreTrueAction):
            shown = parser._get_formatter()._get_help_string(action)
            assert "default" in shown, f"{name} {action.option_strings[0]}: help shows no default"
    assert "(default: " in text or name in ("ranks", "eval-style-report")


def test_train_help_lists_every_yaml_key():
    from loraforge.train import TOP_KEYS

    text = build_parser("train").format_help()
    assert all(f"  {key}:" in text for key in TOP_KEYS), sorted(k for k in TOP_KEYS if f"  {k}:" not in text)


def test_repeated_choices_agree_with_their_modules():
    from loraforge.cora import commands, extract
    from loraforge.eval import prompts, texts

    assert commands.GROUPS == extract.GROUPS
    assert commands.SOURCES == extract.SOURCES
    assert commands.SVDS == extract.SVDS
    assert loraforge_cli.STYLE_TASKS == tuple(prompts.TASKS)
    assert loraforge_cli.STYLE_TEMPLATES == tuple(prompts.TEMPLATES)
    assert loraforge_cli.STYLE_PROTOCOLS == tuple(prompts.PROTOCOLS)
    assert loraforge_cli.NORMALIZATIONS == texts.NORMALIZATIONS


def test_user_errors_are_the_types_they_name():
    """USER_ERRORS matches by (module, name); a renamed or moved class would silently fall out."""
    import importlib

    for module, name in loraforge_cli.USER_ERRORS:
        cls = getattr(importlib.import_module(module), name)
        assert (cls.__module__, cls.__name__) == (module, name)
