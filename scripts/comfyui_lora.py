"""ComfyUI's side of the LoRA legs of scripts/check_comfyui_sd3.py and scripts/check_comfyui_flux.py (run with ComfyUI's
Python, imported by their probes; nothing from nitrofusion): ComfyUI's log recorded (its only report of LoRA keys it
could not place), and a LoRA file applied by the `LoraLoaderModelOnly` node with what ComfyUI made of its keys."""

from __future__ import annotations

import logging
from pathlib import Path


class Recorder(logging.Handler):
    """Every message ComfyUI logs, and those at WARNING or above (what its console shows)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if record.levelno >= logging.WARNING:
            self.warnings.append(record.getMessage())

    def take(self) -> list[str]:
        out, self.messages, self.warnings = self.messages, [], []
        return out

    @classmethod
    def install(cls) -> Recorder:
        """On the root logger; ComfyUI's console handler shows warnings only, as it does for a user."""
        recorder = cls()
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
        logging.getLogger().addHandler(recorder)
        logging.getLogger().setLevel(logging.DEBUG)
        return recorder


def _target(t) -> str:
    """A key map entry: a weight, a slice of a fused one (weight, (dim, offset, size)), or (weight, None, fn)."""
    if isinstance(t, str):
        return t
    where = f"{t[0]}[{t[1][1]}:{t[1][1] + t[1][2]}]" if t[1] is not None else t[0]
    return where + (f" via {t[2].__name__}" if len(t) > 2 else "")


def apply_lora(patcher, path: str | Path, recorder: Recorder, mapping: bool = False):
    """`path` applied to the model of `patcher` by ComfyUI's LoraLoaderModelOnly node at strength 1.0 (as if it sat
    in models/loras/<its folder>/). Returns the patched model and what ComfyUI made of the file's keys: modules
    mapped (comfy.lora.model_lora_keys_unet) and patched, "lora key not loaded" lines, unmapped modules; with
    `mapping`, where each module landed."""
    import comfy.lora
    import comfy.utils
    import folder_paths
    import nodes  # ComfyUI's built-in nodes, LoraLoaderModelOnly among them

    path = Path(path).resolve()
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    folder_paths.add_model_folder_path("loras", str(path.parent.parent))
    tensors = comfy.utils.load_torch_file(str(path), safe_load=True)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    recorder.take()
    patched = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, f"{path.parent.name}/{path.name}", 1.0)[0]
    log = recorder.take()
    patches = {k: len(v) - len(patcher.patches.get(k, [])) for k, v in patched.patches.items()}
    patches = {k: n for k, n in patches.items() if n}  # the weights this LoRA patches: module count each
    report = {"tensors": len(tensors), "modules": len(modules),
              "modules_mapped": sum(m in key_map for m in modules),
              "modules_patched": sum(patches.values()), "weights_patched": len(patches),
              "not_loaded": [m for m in log if m.startswith(("lora key not loaded", "NOT LOADED"))],
              "unmapped": [m for m in modules if m not in key_map]}
    if mapping:
        report["mapping"] = {m.removeprefix("transformer."): _target(key_map[m]).removeprefix("diffusion_model.")
                             for m in modules if m in key_map}
    return patched, report
