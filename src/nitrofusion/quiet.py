"""Dependencies' log lines and warnings that never matter to a nitrofusion user, silenced in one place.

Each logger below prints on import or on a path we never take, before our own one-line result or error, and each
warning is about a dependency's own internals (the reliability rule: a clean terminal; tests/test_terminal.py).
Called first thing in every process we start (the CLI and the demo's helper process), before the dependencies are
imported: a logger's level set later is too late for the lines it printed at import.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

# logger name -> why its warnings are noise to us
NOISY_LOGGERS = {
    # bitsandbytes (8-bit AdamW) loads a 4-bit CPU matmul kernel from the hub at import on CPUs with AVX512-BF16;
    # we never run 4-bit matmuls, and offline (or behind a closed network) the load fails with a warning
    "bitsandbytes": "4-bit CPU kernel we never use",
    # ...through the `kernels` package, whose resolver warns that offline it cannot check the kernel's publisher
    "kernels": "publisher trust check of that same kernel",
    # transformers warns once per image-processor class that torchvision is missing and it uses the PIL one;
    # SDXL pipeline folders name such classes but we never run them
    "transformers.utils.import_utils": "torchvision missing for image processors we never run",
}


# logger name -> (start, part) of one message it logs that is noise, while its other warnings matter
NOISY_MESSAGES = {
    # diffusers' ModelMixin.to(dtype=...) warns on every cast that "modules should be kept in float32" even when
    # the list it names is empty; its loading warnings (missing keys, ...) stay
    "diffusers.models.modeling_utils": ("There are modules in", "should be kept in float32: []"),
}


# (module a Python warning is attributed to, start of its message) -> why it is noise to us; "" matches any
NOISY_WARNINGS = {
    # gradio's queue statistics (the live app, on the first request) use pandas options that pandas 3 deprecates
    ("gradio.queueing", ""): "gradio's internals, nothing a user can change",
    # the stock SDXL pipeline (bench --inference's baseline, in fp16) casts its VAE to fp32 through a method that it
    # deprecates itself
    ("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl", "`upcast_vae` is deprecated"):
        "diffusers' own call of its own deprecated method",
}


class _DropMessage(logging.Filter):
    def __init__(self, start: str, part: str) -> None:
        super().__init__()
        self.start, self.part = start, part

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.start) and self.part in message)


def quiet_dependencies() -> None:
    """Raise each noisy dependency logger to ERROR (its real errors still show), and drop the noisy messages and
    warnings."""
    for module, start in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), module=re.escape(module))
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, (start, part) in NOISY_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(start, part))


@contextlib.contextmanager
def transformers_progress_off() -> Iterator[None]:
    """No per-file 'Loading weights' bars from transformers while models load: a run's output is its own."""
    from transformers.utils import logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            transformers_logging.enable_progress_bar()
