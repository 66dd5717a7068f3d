"""CoRA's `loraforge` subcommands, as the console script lists them (argument parsers only).

Read by `loraforge_cli` without importing the package (no torch: `--help` and argument errors are
answered at once); the work runs in `loraforge.cora.cli` once the arguments are valid. The choices
repeat those of `cora/extract.py` (which imports torch); tests/integrations/test_cli_help.py keeps them equal.
"""
from __future__ import annotations

GROUPS = ("module", "layer")
SOURCES = ("weights", "deltas")
SVDS = ("exact", "randomized")


def _cora_extract(p):
    p.add_argument("--models", nargs="+", required=True,
                   help="model folders (safetensors, single file or sharded) or PEFT LoRA adapter folders")
    p.add_argument("--base", help="base model folder: needed for LoRA adapter inputs and for --source deltas "
                                  "(default: none)")
    p.add_argument("--rank", type=int, required=True, help="basis columns per module (>= the r you will train)")
    p.add_argument("--targets", required=True, help="comma-separated module names, e.g. q_proj,k_proj,v_proj")
    p.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    p.add_argument("--group", choices=GROUPS, default="module",
                   help="module: one basis per module; layer: one shared basis per parent module "
                        "(e.g. q/k/v of an attention block), from the SVD of their averages stacked side by side")
    p.add_argument("--source", choices=SOURCES, default="weights",
                   help="weights: average W_m (paper); deltas: average W_m - W_base (needs --base)")
    p.add_argument("--svd", choices=SVDS, default="exact", help="exact: torch.linalg.svd; randomized: torch.svd_lowrank")
    p.add_argument("--niter", type=int, default=4, help="power iterations of the randomized SVD")
    p.add_argument("--oversample", type=int, default=10, help="extra columns of the randomized SVD")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    p.add_argument("--device", default="cpu", help="where to sum and decompose, e.g. cpu or cuda")


#: name -> (module, function taking the parsed arguments, one-line help, description, add_arguments, epilog)
COMMANDS = {
    "cora-extract": ("loraforge.cora.cli", "extract", "common-subspace basis from fine-tuned models",
                     "Average M fine-tuned models (or LoRA adapters + --base) per module and keep the top-r left "
                     "singular vectors as CoRA's basis for B. Streams: one tensor per input in memory at a time.",
                     _cora_extract, None),
}
ADAPTER_ARGUMENTS: dict = {}  # no command of CoRA's takes a saved adapter folder
#: Errors of these commands that are a user's mistake (one line, exit 2), by (module, class name).
USER_ERRORS = {("loraforge.cora.extract", "CoRAExtractError")}
