"""Known-harmless warnings that vlmtune's own calls would print, each silenced where it arises, with the reason.

Warnings are fixed at the source where vlmtune can (transformers 5.23's activation-checkpointing names in
:mod:`vlmtune.tuning.prepare`, ``use_cache`` turned off with checkpointing); what is left is filtered here, by
exact message, for the one library call that raises it, so a user's own calls still see every warning.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# bitsandbytes >= 0.49 tries, on CPUs with AVX512-BF16, to fetch a faster CPU 4-bit GEMM from the Hugging Face hub
# (the `kernels` package) when it is imported, and logs a warning when that fails, as it always does offline or
# without `kernels`; its own CPU path then runs as usual. vlmtune never downloads at run time, so the warning only
# says what vlmtune asked for.
_BNB_CPU_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Filter the logged warnings above on the loggers that emit them (idempotent)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) and f.prefix == _BNB_CPU_KERNEL for f in logger.filters):
        logger.addFilter(_DropMessage(_BNB_CPU_KERNEL))


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around ``get_peft_model`` / ``PeftModel.from_pretrained``: PEFT (0.21) reads the model's
    ``is_gradient_checkpointing``, a name transformers 5.23 deprecated with a FutureWarning on every read; the
    property it forwards to is the same, so nothing is lost but the message."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
