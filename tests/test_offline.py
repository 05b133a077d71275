"""Model ids without a network (issue 28, item 5): a Hugging Face Hub id that cannot be fetched is one line naming it
and how to point at a downloaded folder, for every command that takes a model; a Hub id in the HF cache resolves
offline; with a network an id downloads what from_pretrained reads (the Hub is mocked: our machines have none). A
folder from an interrupted download (a weights file cut short, a shard its index names missing, a part's folder
missing) is one line naming the file, found from file names and safetensors headers alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest.mock import Mock

import pytest

from nitrofusion.cli import main
from nitrofusion.errors import NitroFusionError

HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty HF cache, HF_HUB_OFFLINE on, and no id resolved earlier in this process; the HF cache folder."""
    from huggingface_hub import constants

    from nitrofusion.worlds.pipelines import hub as hub_module

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_module, "_resolved", {})
    return cache


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The working folder of a command: a prompt file, and the names in it before the command ran."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "p.txt").write_text("a red cat\n")
    monkeypatch.chdir(folder)
    return folder


def cache_snapshot(cache: Path, repo_id: str, source: Path) -> Path:
    """`source` as the HF cache's snapshot of `repo_id` at revision main (the layout huggingface_hub writes)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return Path(shutil.copytree(source, repo / "snapshots" / COMMIT))


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _hub_run(folder: Path) -> Path:
    """An SDXL run folder whose config names a Hub id as its teacher."""
    run = folder / "hubrun"
    (run / "student" / "unet").mkdir(parents=True)
    (run / "student" / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time",
                                                                      "cross_attention_dim": 64}))
    (run / "config.yaml").write_text(f"world: sdxl\nteacher: {HUB_ID}\n")
    return run


@pytest.mark.parametrize("argv, flag", [
    (["distill", "--dry-run", "--preset", "sdxl-tiny", "--teacher", HUB_ID, "--prompts", "p.txt", "--out", "R"],
     "--teacher"),
    (["distill", "--preset", "sdxl-tiny", "--teacher", HUB_ID, "--prompts", "p.txt", "--out", "R"], "--teacher"),
    (["pairs", "--preset", "sdxl-tiny", "--teacher", HUB_ID, "--prompts", "p.txt", "--out", "P"], "--teacher"),
    (["pairs", "--dry-run", "--preset", "sd3-tiny", "--teacher", HUB_ID, "--prompts", "p.txt"], "--teacher"),
    (["generate", "--model", HUB_ID, "--prompt", "a", "--out", "G"], "--model"),
    (["generate", "--model", "hubrun", "--prompt", "a", "--out", "G"], "--base"),
    (["evaluate", "--model", HUB_ID, "--prompts", "p.txt", "--out", "E"], "--model"),
    (["export", HUB_ID, "--format", "diffusers", "--out", "X"], "DIR in its place"),
    (["transfer", "--student", HUB_ID, "--base", "b", "--custom", "c", "--out", "T"], "--student"),
    (["app", "--model", HUB_ID], "--model"),
])
def test_a_hub_id_offline_is_one_line_naming_it_and_the_download(argv, flag, hub, work, capsys):
    if "hubrun" in argv:
        _hub_run(work)
    before = sorted(p.name for p in work.iterdir())
    assert main(argv) == 2
    line = one_line(capsys)
    assert f"`hf download {HUB_ID} --local-dir DIR`" in line and "HF_HUB_OFFLINE is set" in line, line
    assert (f"give {flag} DIR" if flag.startswith("--") else flag) in line, line
    assert sorted(p.name for p in work.iterdir()) == before  # no run, cache or output folder begun
    assert not hub.exists()  # nothing fetched into the HF cache either


def test_a_vae_id_offline_is_refused_before_the_pipeline_loads(hub, work, tiny_sdxl, capsys):
    assert main(["generate", "--model", str(tiny_sdxl), "--shift", "250", "--vae", "madebyollin/taesdxl",
                 "--prompt", "a", "--out", "G"]) == 2
    assert "give --vae DIR" in one_line(capsys) and not (work / "G").exists()


def test_a_hub_id_in_the_hf_cache_resolves_offline(hub, work, tiny_sdxl, capsys):
    from nitrofusion.worlds import world_of_model

    snapshot = cache_snapshot(hub, "nitro/tiny-sdxl", tiny_sdxl)
    assert main(["distill", "--dry-run", "--preset", "sdxl-tiny", "--teacher", "nitro/tiny-sdxl", "--prompts",
                 "p.txt", "--out", "R"]) == 0
    out = capsys.readouterr().out
    assert "every check passed" in out and f"nitro/tiny-sdxl ({snapshot})" in out
    assert world_of_model("nitro/tiny-sdxl").name == "sdxl"


def test_an_interrupted_download_in_the_hf_cache_names_the_missing_file(hub, work, tiny_sdxl, capsys):
    snapshot = cache_snapshot(hub, "nitro/partial", tiny_sdxl)
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # the blob never arrived
    assert main(["distill", "--dry-run", "--preset", "sdxl-tiny", "--teacher", "nitro/partial", "--prompts",
                 "p.txt", "--out", "R"]) == 2
    line = one_line(capsys)
    assert f"{snapshot / 'unet' / 'diffusion_pytorch_model.safetensors'} is missing" in line, line


# ---- with a network (the Hub mocked) ----------------------------------------------------------------------------


@pytest.fixture
def online(hub, monkeypatch):
    """The Hub reachable: model_info lists `files`, downloads are recorded in `calls`."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    state = {"files": [], "calls": [], "listing_error": None}

    def model_info(self, repo_id, **kwargs):
        if state["listing_error"] is not None:
            raise state["listing_error"]
        return Mock(siblings=[Mock(rfilename=name) for name in state["files"]])

    monkeypatch.setattr(HfApi, "model_info", model_info)
    return state


SDXL_REPO = [  # a pipeline repo as the Hub holds one: extras beside the parts from_pretrained reads
    "model_index.json", "sd_xl_base_1.0.safetensors", "README.md", "vae_1_0/diffusion_pytorch_model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/model.onnx", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/flax_model.msgpack", "tokenizer/vocab.json",
    "tokenizer/merges.txt", "scheduler/scheduler_config.json", "vae/config.json", "vae/diffusion_pytorch_model.bin",
    "safety_checker/pytorch_model.bin"]


@pytest.fixture
def downloads(online, tmp_path, monkeypatch):
    """hf_hub_download gives an SDXL-like model_index.json; snapshot_download records what it was asked for."""
    import huggingface_hub

    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "safety_checker": [None, None],
                                 **{p: ["diffusers", "X"] for p in ("unet", "vae", "text_encoder", "tokenizer",
                                                                    "scheduler")}}))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **k: str(index))

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        online["calls"].append((repo_id, sorted(allow_patterns)))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return tmp_path / "snapshot"


def test_a_pipeline_id_downloads_what_from_pretrained_reads(online, downloads):
    from nitrofusion.worlds.pipelines.hub import local_model

    online["files"] = SDXL_REPO
    assert local_model(HUB_ID, "--teacher") == downloads
    assert local_model(HUB_ID, "--base") == downloads  # once per process
    assert online["calls"] == [(HUB_ID, [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.bin"])]


def test_a_student_repo_downloads_its_folders_weights_and_configs(online, downloads):
    from nitrofusion.worlds.pipelines.hub import local_model

    online["files"] = ["README.md", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                       "unet/diffusion_pytorch_model.fp16.safetensors", "scheduler/scheduler_config.json",
                       "samples/grid.png"]
    assert local_model("someone/student", "--model") == downloads
    assert online["calls"] == [("someone/student", ["scheduler/scheduler_config.json", "unet/config.json",
                                                    "unet/diffusion_pytorch_model.safetensors"])]


@pytest.mark.parametrize("problem, needle", [
    ("missing", "no Hugging Face Hub repository of that name (a private one needs `hf auth login` or HF_TOKEN)"),
    ("gated", f"gated Hugging Face Hub repository: accept its terms at https://huggingface.co/{HUB_ID}"),
    ("loose files", f"holds no diffusers pipeline (model_index.json) or model folder (config.json); for one weights "
                    f"file in it run `hf download {HUB_ID} FILE --local-dir DIR`"),
    ("no network", "the Hub cannot be reached: ConnectionError: Name or service not known"),
])
def test_hub_failures_are_one_line(problem, needle, online, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from nitrofusion.worlds.pipelines.hub import local_model

    online["files"] = ["model_index.json"] if problem != "loose files" else ["nitrosd-realism_unet.safetensors"]
    if problem == "missing":
        online["listing_error"] = RepositoryNotFoundError("404 Client Error", response=Mock())
    if problem == "no network":
        online["listing_error"] = ConnectionError("Name or service not known")

    def gated(repo_id, *args, **kwargs):
        raise GatedRepoError("403 Client Error", response=Mock())

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(NitroFusionError) as info:
        local_model(HUB_ID, "--teacher")
    assert needle in str(info.value) and len(str(info.value).splitlines()) == 1, str(info.value)


def test_without_a_network_a_cached_id_still_resolves(online, hub, tiny_sdxl):
    from nitrofusion.worlds.pipelines.hub import local_model

    snapshot = cache_snapshot(hub, "nitro/tiny-sdxl", tiny_sdxl)
    online["listing_error"] = ConnectionError("Name or service not known")
    assert local_model("nitro/tiny-sdxl", "--teacher") == snapshot


def test_paths_are_never_taken_for_hub_ids(tmp_path):
    from nitrofusion.worlds.pipelines.hub import is_hub_id

    assert is_hub_id(HUB_ID) and is_hub_id("someone/model.v2")
    assert not any(is_hub_id(p) for p in ("/abs/path", "./rel/path", "no-slash", "a/b/c", "runs/unet.safetensors",
                                          "../up/one", str(tmp_path)))


# ---- folders from an interrupted download -----------------------------------------------------------------------


def _cut(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _shards_one_missing(folder: Path) -> None:
    weights = folder / "text_encoder" / "model.safetensors"
    weights.rename(folder / "text_encoder" / "model-00001-of-00002.safetensors")
    (folder / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


DAMAGE = {  # what an interrupted download leaves -> the words that name it
    "weights cut short": (lambda f: _cut(f / "unet" / "diffusion_pytorch_model.safetensors"),
                          "unet/diffusion_pytorch_model.safetensors is cut short: "),
    "cut inside the header": (lambda f: _cut(f / "vae" / "diffusion_pytorch_model.safetensors", 20),
                              "vae/diffusion_pytorch_model.safetensors is cut short inside its header (20 bytes)"),
    "a shard missing": (_shards_one_missing, "model.safetensors.index.json names "),
    "weights missing": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
                        "unet as UNet2DConditionModel (no weights file: "),
    "a config missing": (lambda f: (f / "text_encoder_2" / "config.json").unlink(),
                         "text_encoder_2/config.json is missing"),
    "a scheduler config missing": (lambda f: (f / "scheduler" / "scheduler_config.json").unlink(),
                                   "scheduler/scheduler_config.json is missing"),
    "a part's folder missing": (lambda f: shutil.rmtree(f / "vae"), "it lacks vae/, which its model_index.json lists"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_interrupted_download_is_one_line_naming_the_file(damage, tiny_sdxl, work, capsys, monkeypatch):
    import safetensors
    import safetensors.torch

    def never(*args, **kwargs):
        raise AssertionError("a weights file was read beyond its header")

    folder = Path(shutil.copytree(tiny_sdxl, work / "teacher"))
    breaks, needle = DAMAGE[damage]
    breaks(folder)
    before = sorted(p.name for p in work.iterdir())
    monkeypatch.setattr(safetensors, "safe_open", never)
    monkeypatch.setattr(safetensors.torch, "load_file", never)
    assert main(["distill", "--dry-run", "--preset", "sdxl-tiny", "--teacher", str(folder), "--prompts", "p.txt",
                 "--out", "R"]) == 2
    line = one_line(capsys)
    assert needle in line and "fetch" in line, line
    assert sorted(p.name for p in work.iterdir()) == before


def test_a_cut_short_unet_file_is_named_before_it_is_read(tmp_path):
    import torch
    from safetensors.torch import save_file

    from nitrofusion.models.weights import read_weights

    path = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(64, 4, 3, 3)}, str(path))
    _cut(path)
    with pytest.raises(NitroFusionError, match=r"cannot read UNet weights: .*unet.safetensors is cut short: "):
        read_weights(path)


def test_variant_files_the_loader_skips_are_not_checked(tiny_sdxl, tmp_path):
    """A full `hf download` also holds fp16 variants: a variant's index naming shards that are not there, or a
    variant file in a state of its own, is no reason to refuse the plain weights the loader reads."""
    from nitrofusion.worlds.pipelines.family import SDXL, check_pipeline_folder

    folder = Path(shutil.copytree(tiny_sdxl, tmp_path / "full"))
    (folder / "text_encoder" / "model.fp16.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model.fp16-00001-of-00002.safetensors"}}))
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"\0" * 16)
    assert check_pipeline_folder(folder, SDXL) is SDXL
