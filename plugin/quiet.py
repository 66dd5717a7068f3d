"""Filters, installed on `import loraforge`, for library messages that ask nothing of the user.

Each names the message, the library that emits it, and why it is dropped; anything else the
libraries say still shows.
"""
from __future__ import annotations

import logging
import warnings

# bitsandbytes 0.50 logs at import, on CPUs with AVX512-BF16, that the optional `kernels` package
# (a faster 4-bit CPU matmul downloaded from the Hub) is missing; 4-bit layers work without it, and
# offline nothing can be downloaded. Filtered on its own logger, before bitsandbytes is imported.
BNB_KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community"
# transformers 5 deprecated `is_gradient_checkpointing`, which PEFT 0.21 and TRL 1.16 still read
# (when a model is wrapped, loaded with an adapter, or trained): the code to change is theirs.
GRADIENT_CHECKPOINTING = r"`is_gradient_checkpointing` is deprecated"
# TRL 1.16's SFTConfig sets the deprecated `gradient_checkpointing` field by default, so transformers
# warns on every `SFTConfig(...)`, whether or not the user named the field.
GRADIENT_CHECKPOINTING_FIELD = r"`gradient_checkpointing` is deprecated and will be removed"


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install_library_filters() -> None:
    """Drop the messages above (idempotent)."""
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropPrefix) for f in bnb.filters):
        bnb.addFilter(_DropPrefix(BNB_KERNELS))
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING, category=FutureWarning)
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_FIELD, category=FutureWarning)


class new_head_expected:
    """Within this block, transformers' "LOAD REPORT" (a table of the keys a checkpoint lacks, with
    terminal colour codes even when the output is a file) is dropped: loading an encoder to
    fine-tune as a classifier lacks the new head by design, and the report says nothing else a
    user can act on. Other messages still show."""

    def __enter__(self):
        self._logger = logging.getLogger("transformers.modeling_utils")
        self._filter = _DropContaining("LOAD REPORT")
        self._logger.addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        self._logger.removeFilter(self._filter)
        return False


class _DropContaining(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


class c_stderr_silenced:
    """Within this block, what C/C++ code writes to file descriptor 2 is discarded. For KenLM's
    ARPA loader, which writes "Loading the LM will be faster if you build a binary file." and a
    progress bar straight to std::cerr (its Python binding exposes no switch for the note); a
    failed load still raises, with its message, in Python."""

    def __enter__(self):
        import os
        import sys

        sys.stderr.flush()
        self._saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        return self

    def __exit__(self, *exc):
        import os

        os.dup2(self._saved, 2)
        os.close(self._saved)
        return False
