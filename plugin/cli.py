"""`loraforge` console script: see `loraforge_cli` (a top-level module, so that help and argument
errors do not import torch through this package's `__init__`). Kept as the import path that
callers of `loraforge.cli.main` use."""
from loraforge_cli import COMMANDS, main  # noqa: F401

if __name__ == "__main__":
    import sys

    sys.exit(main())
