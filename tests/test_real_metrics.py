"""Real-model metrics with tiny random-weight stand-ins: the code paths and the arithmetic, not the numbers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nitrofusion.errors import NitroFusionError
from nitrofusion.evaluation import real_metrics as rm
from nitrofusion.evaluation.real_metrics import RealMetrics, RealMetricsConfig

PROJECTION = 16


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIPModel + CLIPProcessor folder (32 px images, character-level offline tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from nitrofusion.worlds.sdxl.testing import BOS, EOS, write_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    vocab = write_tokenizer(folder)
    ids = dict(vocab_size=len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
               max_position_embeddings=77)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config={**tower, **ids}, vision_config={**tower, "image_size": 32, "patch_size": 8},
                         projection_dim=PROJECTION)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _clip(folder: Path):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


def _images(n: int, seed: int, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _write_pngs(folder: Path, images: torch.Tensor) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(rm.to_uint8(images)):
        names.append(f"{i:04d}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / names[-1])
    return names


def _mlp_file(path: Path, input_size: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.save(rm.AestheticMLP(input_size).state_dict(), path)
    return path


def test_clip_score_is_torchmetrics_raw_cosine(tiny_clip):
    images = _images(3, seed=1, size=(40, 48))
    prompts = ["a red cat", "a photo of a dog", "a very long caption " * 8]  # > 77 tokens: truncated, not an error
    metrics = RealMetrics(RealMetricsConfig(clip=str(tiny_clip), device="cpu", batch_size=2))
    metrics.update(images, prompts)
    result = metrics.compute()
    assert set(result) == {"clip_score", "fid", "fd_clip", "aesthetic", "image_reward"}
    row = result["clip_score"]
    assert row["n"] == 3 and "raw mean cosine" in row["library"] and row["weights"] == str(tiny_clip)

    model, processor = _clip(tiny_clip)  # the same quantity straight from transformers
    with torch.no_grad():
        pixels = processor(images=list(rm.to_uint8(images)), return_tensors="pt")["pixel_values"]
        text = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
    assert row["value"] == pytest.approx(F.cosine_similarity(img, txt).mean().item(), abs=1e-5)
    assert -1 <= row["value"] <= 1  # a cosine, not torchmetrics' 0-100 scale
    assert "--inception" in result["fid"]["skipped"] and "reference" in result["fd_clip"]["skipped"]


def test_fd_clip_zero_for_the_reference_itself_and_positive_for_other_images(tiny_clip, tmp_path):
    reference = _images(24, seed=2)
    names = _write_pngs(tmp_path / "ref", reference)
    Image.new("RGB", (64, 40), "white").save(tmp_path / "ref" / "not-in-the-list.png")  # excluded by the file list
    cfg = RealMetricsConfig(clip=str(tiny_clip), reference=str(tmp_path / "ref"), reference_files=names,
                            reference_size=32, batch_size=8, device="cpu")
    metrics = RealMetrics(cfg)
    same = rm.evaluate_images(iter([reference[:8], reference[8:]]), ["a cat"] * 24, metrics=metrics)["fd_clip"]
    assert same["n"] == 24 and same["reference_n"] == 24 and "not Inception" in same["library"]
    assert abs(same["value"]) < 1e-3 and "note" not in same  # 24 samples > 16 features: no small-sample note
    other = torch.linspace(0, 1, 24).view(24, 1, 1, 1).expand(24, 3, 32, 32)  # flat grey levels
    different = rm.evaluate_images([other], ["a cat"] * 24, metrics=metrics)["fd_clip"]
    assert different["reference_n"] == 24  # reference kept across reset(), not read twice
    assert different["value"] > 1e-2 and different["value"] > 100 * abs(same["value"])


def test_reference_images_are_centre_cropped_and_missing_ones_named(tmp_path):
    image = np.zeros((40, 64, 3), np.uint8)
    image[:, 12:52] = 255  # the centre square is white, the side bands black
    Image.fromarray(image).save(tmp_path / "wide.jpg", quality=100)
    tensor = rm.read_reference_image(tmp_path / "wide.jpg", 32)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8 and tensor.float().mean() > 250
    with pytest.raises(NitroFusionError, match="missing, e.g. .*gone.png"):
        rm.reference_paths(tmp_path, ["wide.jpg", "gone.png"])
    with pytest.raises(NitroFusionError, match="reference folder not found"):
        rm.reference_paths(tmp_path / "nope")
    assert [p.name for p in rm.reference_paths(tmp_path)] == ["wide.jpg"]


def test_corrupt_reference_image_fails_before_any_image_is_generated(tiny_clip, tmp_path):
    _write_pngs(tmp_path / "ref", _images(2, seed=3))
    (tmp_path / "ref" / "0002.png").write_bytes(b"not a png")
    metrics = RealMetrics(RealMetricsConfig(clip=str(tiny_clip), reference=str(tmp_path / "ref"), device="cpu"))

    def generator():
        raise AssertionError("generation started before the reference was checked")
        yield

    with pytest.raises(NitroFusionError, match=r"cannot read reference image .*0002\.png") as e:
        rm.evaluate_images(generator(), ["a cat"], metrics=metrics)
    assert "\n" not in str(e.value)


def test_fid_is_skipped_with_the_precise_reason(tmp_path, monkeypatch):
    _write_pngs(tmp_path / "ref", _images(2, seed=4))
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"stand-in: never loaded when torch-fidelity is missing")

    def fid_reason(**kw) -> str:
        metrics = RealMetrics(RealMetricsConfig(device="cpu", **kw))
        metrics.update(_images(2, seed=5), ["a", "b"])
        return metrics.compute()["fid"]["skipped"]

    assert "no --inception weights given" in fid_reason()
    assert "no --reference images given" in fid_reason(inception=str(weights))
    monkeypatch.setattr(rm, "_torch_fidelity_missing", lambda: rm.PIP_TORCH_FIDELITY)  # as here: no torchvision
    assert "pip install torch-fidelity" in fid_reason(inception=str(weights), reference=str(tmp_path / "ref"))
    with pytest.raises(NitroFusionError, match="Inception weights not found"):
        RealMetrics(RealMetricsConfig(inception=str(tmp_path / "none.pth"), device="cpu"))


def test_aesthetic_is_the_mlp_on_normalised_clip_embeddings(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    pth = _mlp_file(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", PROJECTION)
    images = _images(5, seed=6)
    metrics = RealMetrics(RealMetricsConfig(aesthetic=str(pth), aesthetic_clip=str(tiny_clip), device="cpu"))
    row = rm.evaluate_images([images[:3], images[3:]], ["x"] * 5, metrics=metrics)["aesthetic"]

    model, processor = _clip(tiny_clip)
    mlp = rm.AestheticMLP(PROJECTION).eval()
    mlp.load_state_dict(torch.load(pth, weights_only=True))
    with torch.no_grad():
        pixels = processor(images=list(rm.to_uint8(images)), return_tensors="pt")["pixel_values"]
        expected = mlp(F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)).mean()
    assert row["n"] == 5 and row["value"] == pytest.approx(expected.item(), abs=1e-5)
    assert row["weights"] == f"{pth} + {tiny_clip}"

    save_file(torch.load(pth, weights_only=True), tmp_path / "mlp.safetensors")  # the same weights as safetensors
    metrics = RealMetrics(RealMetricsConfig(aesthetic=str(tmp_path / "mlp.safetensors"),
                                            aesthetic_clip=str(tiny_clip), device="cpu"))
    assert rm.evaluate_images([images], ["x"] * 5, metrics=metrics)["aesthetic"]["value"] == pytest.approx(
        row["value"], abs=1e-6)


def test_aesthetic_errors_are_one_line(tiny_clip, tmp_path):
    wide = _mlp_file(tmp_path / "l14.pth", 768)  # the real predictor's input: ViT-L/14 embeddings
    cases = {
        "reads 768-d CLIP embeddings but --aesthetic-clip .* gives 16-d": dict(aesthetic=str(wide),
                                                                              aesthetic_clip=str(tiny_clip)),
        "--aesthetic needs --aesthetic-clip too": dict(aesthetic=str(wide)),
        "--aesthetic-clip needs --aesthetic too": dict(aesthetic_clip=str(tiny_clip)),
        "aesthetic predictor weights not found": dict(aesthetic=str(tmp_path / "x.pth"), aesthetic_clip="c"),
        "cannot load the CLIP model": dict(aesthetic=str(wide), aesthetic_clip=str(tmp_path / "no-clip")),
    }
    state = torch.load(wide, weights_only=True)
    torch.save({k.replace("layers.7", "head"): v for k, v in state.items()}, tmp_path / "keys.pth")
    cases["not an improved-aesthetic-predictor state dict .*head.bias"] = dict(aesthetic=str(tmp_path / "keys.pth"),
                                                                               aesthetic_clip=str(tiny_clip))
    torch.save({**state, "layers.2.weight": torch.zeros(64, 1024)}, tmp_path / "shape.pth")
    cases[r"layers.2.weight has shape \(64, 1024\)"] = dict(aesthetic=str(tmp_path / "shape.pth"),
                                                            aesthetic_clip=str(tiny_clip))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    cases["cannot read aesthetic predictor weights"] = dict(aesthetic=str(tmp_path / "junk.pth"),
                                                            aesthetic_clip=str(tiny_clip))
    for message, kw in cases.items():
        with pytest.raises(NitroFusionError, match=message) as e:
            RealMetrics(RealMetricsConfig(device="cpu", **kw))
        assert "\n" not in str(e.value)


def test_image_reward_is_skipped_without_its_checkpoint_or_package(monkeypatch):
    metrics = RealMetrics(RealMetricsConfig(device="cpu"))
    metrics.update(_images(1, seed=7), ["a cat"])
    assert "no --image-reward checkpoint given" in metrics.compute()["image_reward"]["skipped"]
    monkeypatch.setattr(rm, "_image_reward_missing", lambda: rm.PIP_IMAGE_REWARD)  # as here
    metrics = RealMetrics(RealMetricsConfig(image_reward="ImageReward-v1.0", device="cpu"))
    metrics.update(_images(1, seed=7), ["a cat"])
    result = metrics.compute()
    assert result["image_reward"] == {"skipped": rm.PIP_IMAGE_REWARD}
    assert "pip install image-reward" in rm.PIP_IMAGE_REWARD
    assert all("skipped" in row and "\n" not in row["skipped"] for row in result.values())


def test_inputs_are_checked(tiny_clip):
    metrics = RealMetrics(RealMetricsConfig(device="cpu"))
    with pytest.raises(NitroFusionError, match=r"must be in \[0, 1\]"):
        metrics.update(_images(2, seed=8) * 2 - 1, ["a", "b"])
    with pytest.raises(NitroFusionError, match="2 images but 1 prompts"):
        metrics.update(_images(2, seed=8), ["a"])
    with pytest.raises(NitroFusionError, match="no images were given"):
        metrics.compute()
    with pytest.raises(NitroFusionError, match="1 images for 2 prompts"):
        rm.evaluate_images([_images(1, seed=8)], ["a", "b"], metrics=metrics)
    with pytest.raises(NitroFusionError, match="more images than prompts"):
        rm.evaluate_images([_images(3, seed=8)], ["a", "b"], metrics=metrics)
    with pytest.raises(NitroFusionError, match="cannot load the CLIP model"):
        RealMetrics(RealMetricsConfig(clip="/no/such/clip-folder", device="cpu"))
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in rm.to_uint8(_images(2, seed=9))]
    assert torch.equal(rm.to_uint8(pil), rm.to_uint8(_images(2, seed=9)))  # PIL batches score the same pixels


def _coco(path: Path, images: int = 20) -> Path:
    anns, next_id = [], 0
    for i in range(images):
        for c in range(1 + i % 3):
            anns.append({"id": next_id, "image_id": 100 + i, "caption": f"  image {i} caption {c}\n"})
            next_id += 1
    data = {"images": [{"id": 100 + i, "file_name": f"COCO_val2014_{100 + i:012d}.jpg"} for i in range(images + 1)],
            "annotations": anns[::-1]}  # file order must not matter; the last image has no caption
    path.write_text(json.dumps(data))
    return path


def test_coco_captions_protocol(tmp_path):
    path = _coco(tmp_path / "captions_val2014.json")
    pairs = rm.coco_captions(path, n=8, seed=0)
    assert len(pairs) == 8 and len({f for _, f in pairs}) == 8
    for caption, file_name in pairs:  # one caption of that very image, whitespace-normalised
        number = int(file_name[-8:-4]) - 100
        assert caption.startswith(f"image {number} caption ") and caption == caption.strip()
    assert rm.coco_captions(path, n=8, seed=0) == pairs
    assert rm.coco_captions(path, n=8, seed=1) != pairs
    with pytest.raises(NitroFusionError, match="has 20 captioned images, fewer than the 21 asked"):
        rm.coco_captions(path, n=21)
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(NitroFusionError, match="not a COCO captions annotation file"):
        rm.coco_captions(tmp_path / "bad.json")

    rm.write_caption_pairs(pairs, tmp_path / "coco5k.tsv")
    assert rm.load_caption_pairs(tmp_path / "coco5k.tsv") == pairs == rm.load_caption_pairs(path, n=8, seed=0)
    (tmp_path / "bad.tsv").write_text("file_name\tcaption\nonly-a-name\n")
    with pytest.raises(NitroFusionError, match="line 2: expected 'file_name<TAB>caption'"):
        rm.read_caption_pairs(tmp_path / "bad.tsv")


@pytest.mark.parametrize("world", ["sdxl", "sd", "sd3"])
def test_evaluate_cli_scores_a_run_on_a_caption_set(tiny_sdxl, prompt_file, tiny_clip, tmp_path, capsys, world):
    from nitrofusion.cli import main
    from nitrofusion.worlds.sd.testing import build_random_sd
    from nitrofusion.worlds.sd3.testing import build_random_sd3

    run = tmp_path / "run"
    teacher = {"sdxl": lambda: tiny_sdxl, "sd": lambda: build_random_sd(tmp_path / "sd2", "sd2"),
               "sd3": lambda: build_random_sd3(tmp_path / "sd3")}[world]()
    assert main(["distill", "--preset", f"{world}-tiny", "--teacher", str(teacher), "--prompts", str(prompt_file),
                 "--out", str(run)]) == 0
    names = _write_pngs(tmp_path / "ref", _images(6, 5, (48, 48)))
    rm.write_caption_pairs([(f"a photo number {i}", n) for i, n in enumerate(names)], tmp_path / "captions.tsv")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run), "--coco", str(tmp_path / "captions.tsv"), "--samples", "4",
                 "--reference", str(tmp_path / "ref"), "--clip", str(tiny_clip), "--steps", "1", "2",
                 "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert [row["steps"] for row in r["rows"]] == [1, 2] and r["samples"] == 4
    for row in r["rows"]:
        assert row["clip_score"]["n"] == 4 and -1 <= row["clip_score"]["value"] <= 1
        assert row["fd_clip"]["reference_n"] == 4  # the 4 drawn captions' own images, not the whole folder
        assert "skipped" in row["fid"] and "skipped" in row["aesthetic"] and "skipped" in row["image_reward"]
    assert r["rows"][0]["clip_score"]["value"] != r["rows"][1]["clip_score"]["value"]
    md = (out / "results.md").read_text()
    assert "FD-CLIP (not FID)" in md and "skipped:" in md
    assert (out / "captions.tsv").exists() and (out / "grid.png").exists()
    assert "1 step(s): clip_score" in capsys.readouterr().out
