"""Log lines of other packages that carry no information for users of this package, dropped one message at a time
(a filter on the logger that emits it, matching the exact message), so that every other warning still shows.

- For the whole session: diffusers' `ModelMixin.to(dtype)` warns that modules "should be kept in float32: []" even
  when the list is empty (`pipe.to(torch.bfloat16)`, `from_pipe`).
- While `import enat_diffusers` imports diffusers: the lines that torch, torchao and diffusers print when torchao (the
  `quant` extra) is imported: CUDA kernels that do not load on this machine, a torch deprecation aimed at torchao, and
  diffusers' note that torchao-serialized checkpoints may not load.
"""

import contextlib
import logging
import re

SESSION_NOISE = (("diffusers.models.modeling_utils", re.compile(r"should be kept in float32: \[\]\.")),)

IMPORT_NOISE = (
    ("torchao", re.compile(r"^Failed to load \S*torchao\S*_C")),
    ("torch.utils._pytree", re.compile(r"is an Enum subclass and is now natively supported by torch\.compile")),
    ("diffusers.quantizers.torchao.torchao_quantizer", re.compile(r"^Unable to import `torchao` Tensor objects")),
)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def _install(noise) -> list[tuple[logging.Logger, logging.Filter]]:
    installed = []
    for name, pattern in noise:
        logger, drop = logging.getLogger(name), _DropMessage(pattern)
        logger.addFilter(drop)
        installed.append((logger, drop))
    return installed


def silence_session_noise() -> None:
    """Drops `SESSION_NOISE` from now on (once per session)."""
    for name, pattern in SESSION_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))


@contextlib.contextmanager
def import_noise_silenced():
    """Drops `IMPORT_NOISE` inside the block."""
    installed = _install(IMPORT_NOISE)
    try:
        yield
    finally:
        for logger, drop in installed:
            logger.removeFilter(drop)
