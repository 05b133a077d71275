"""Dependencies' log lines that never matter to a nitrofusion user, silenced in one place.

Each logger below prints on import or on a path we never take, before our own one-line result or error
(the reliability rule: a clean terminal). Called first thing in every process we start (the CLI and the
demo's helper process), before the dependencies are imported: a logger's level set later is too late for
the lines it printed at import.
"""

from __future__ import annotations

import logging

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


def quiet_dependencies() -> None:
    """Raise each noisy dependency logger to ERROR (its real errors still show)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
