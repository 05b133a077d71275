"""The diffusers pipeline families: SDXL and Stable Diffusion 1.x / 2.x (worlds/sd/), which share this folder's
inference machinery (pipeline, export, fast path, evaluation), SD3 / 3.5 (worlds/sd3/) and FLUX.1 (worlds/flux/). A
folder's family comes from what diffusers wrote in it (model_index.json's class, the UNet's config), never from a
name, so a run, an export or a base folder of another family is refused in one line that names both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...errors import NitroFusionError


@dataclass(frozen=True)
class Family:
    world: str  # the world (and config section) that trains it
    label: str  # for messages
    pipeline: str  # the diffusers pipeline class
    parts: tuple[str, ...]  # model_index.json entries a usable folder must have
    text_time: bool  # SDXL's micro-conditioning (addition_embed_type "text_time") in the UNet
    article: str = "a"
    listed: tuple[str, ...] = ()  # optional parts, loaded whenever model_index.json lists them (SD3's T5)

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)


SDXL = Family("sdxl", "SDXL", "StableDiffusionXLPipeline",
              ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"), True, "an")
SD = Family("sd", "Stable Diffusion 1.x/2.x", "StableDiffusionPipeline",
            ("unet", "vae", "text_encoder", "tokenizer", "scheduler"), False)
SD3 = Family("sd3", "SD3", "StableDiffusion3Pipeline",
             ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"), False,
             "an", ("text_encoder_3", "tokenizer_3"))
FLUX = Family("flux", "FLUX.1", "FluxPipeline",
              ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"), False)
FAMILIES = {f.world: f for f in (SDXL, SD, SD3, FLUX)}


def family_named(world: str) -> Family:
    if world not in FAMILIES:
        raise NitroFusionError(f"world {world!r} has no diffusers pipeline family (choose {', '.join(FAMILIES)})")
    return FAMILIES[world]


def family_of_unet_config(config: dict) -> Family:
    return SDXL if config.get("addition_embed_type") == "text_time" else SD


def _describe(name: str | None) -> str:
    for f in FAMILIES.values():
        if f.pipeline == name:
            return f"{f.article} {f.label} pipeline ({name})"
    return f"a {name} folder" if name else "a folder of unknown class"


def check_pipeline_folder(folder: Path, expect: Family | None = None, role: str = "teacher folder") -> Family:
    """The family of a diffusers pipeline folder; a folder that is no pipeline, lacks a part, or (with `expect`)
    belongs to another family is one line naming what it is and what was needed."""
    index = folder / "model_index.json"
    if not index.is_file():
        want = expect.pipeline if expect else "StableDiffusionXLPipeline or StableDiffusionPipeline"
        raise NitroFusionError(f"{role} {folder} is not a diffusers pipeline (no model_index.json); give a folder "
                               f"written by {want}.save_pretrained")
    try:
        entries = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise NitroFusionError(f"{index} is not valid JSON ({e.msg}); re-save the pipeline") from None
    name = entries.get("_class_name")
    family = next((f for f in FAMILIES.values() if f.pipeline == name), None)
    if expect is not None and family is not expect:
        raise NitroFusionError(f"{role} {folder} is {_describe(name)}, but world '{expect.world}' needs "
                               f"{_describe(expect.pipeline)}: give such a folder, or a preset of world "
                               f"'{family.world if family else '?'}'")
    if family is None:
        raise NitroFusionError(f"{role} {folder} is {_describe(name)}; nitrofusion reads "
                               f"{' and '.join(f.pipeline for f in FAMILIES.values())} folders")
    unlisted = [p for p in family.parts if not _listed(entries, p)]
    if unlisted:
        raise NitroFusionError(f"{role} {folder} is not a complete {family.label} pipeline: it lacks "
                               f"{', '.join(unlisted)} (its model_index.json lists no such part)")
    loaded = [*family.parts, *(p for p in family.listed if _listed(entries, p))]
    absent = [p for p in loaded if not (folder / p).is_dir()]
    if absent:
        raise NitroFusionError(f"{role} {folder} is not a complete {family.label} pipeline: it lacks "
                               f"{', '.join(f'{p}/' for p in absent)}, which its model_index.json lists (an "
                               "interrupted download? fetch those folders again)")
    for part in loaded:
        check_part_files(folder / part, *entries[part][:2])
    return family


def _listed(entries: dict, part: str) -> bool:
    entry = entries.get(part)
    return isinstance(entry, list) and len(entry) >= 2 and entry[0] is not None


NO_WEIGHTS = ("Tokenizer", "TokenizerFast", "Scheduler")  # parts of a pipeline that hold no weights


def check_part_files(folder: Path, library: str, cls: str) -> None:
    """A pipeline part's files as its loader will want them, from names and safetensors headers alone: a missing
    config, weights file or shard, or a file cut short (an interrupted download) is one line naming the file."""
    from ...models.weights import weights_problem

    if str(cls).endswith("Scheduler"):
        config = folder / "scheduler_config.json"
        problem = None if config.is_file() else f"{config} is missing"
    elif str(cls).endswith(NO_WEIGHTS):
        return  # tokenizer files vary by class; their loader's error is wrapped where they load
    else:
        problem = weights_problem(folder, "model.safetensors" if library == "transformers" else
                                  "diffusion_pytorch_model.safetensors")
    if problem:
        raise NitroFusionError(f"cannot load {folder} as {cls} ({problem}); the download was interrupted or the "
                               "folder damaged: fetch that folder again")
