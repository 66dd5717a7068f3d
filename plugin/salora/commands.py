"""SaLoRA's `loraforge` subcommands, as the console script lists them (argument parsers only).

Read by `loraforge_cli` without importing the package (no torch: `--help` and argument errors are
answered at once); the work runs in `loraforge.salora.cli` once the arguments are valid.
"""
from __future__ import annotations


def _ranks(p):
    p.add_argument("adapter", help="folder of a saved adapter (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--png", help="also write the layers × module-type heat map to this PNG file (default: none)")
    p.add_argument("--json", help="also write the numbers to this JSON file (default: none)")


#: name -> (module, function taking the parsed arguments, one-line help, description, add_arguments, epilog)
COMMANDS = {
    "ranks": ("loraforge.salora.cli", "ranks", "per-module rank table of a SaLoRA adapter",
              "Per-module ranks of a SaLoRA adapter (or of a stock LoRA adapter written by `loraforge export`).",
              _ranks, None),
}
#: command -> (its argument naming a saved adapter folder, the files that folder must hold): checked
#: before any import, so a mistyped path is answered at once.
ADAPTER_ARGUMENTS = {"ranks": ("adapter", ("adapter_config.json", "adapter_model.safetensors"))}
