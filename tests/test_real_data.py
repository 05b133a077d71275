"""Real images as the heads' real side (real_data.py), the R1 penalty, and the k-NN manifold metrics."""

import json

import numpy as np
import pytest
import torch

from nitrofusion.cli import main
from nitrofusion.data.pairs import MixedPairs, MixLoader, Pairs
from nitrofusion.data.real_data import caption_folder, folder_real_pairs, training_source
from nitrofusion.evaluation.manifold import knn_radii, per_class_coverage, precision_recall_coverage
from nitrofusion.method.losses import r1_penalty
from nitrofusion.worlds import world_named
from nitrofusion.worlds.mini.data import mini_real_pairs


def test_mini_real_rows_are_fashion_mnist_with_their_class_prompts(mini_adapter):
    from nitrofusion.worlds.mini.data import class_prompts, load_split

    pairs = mini_real_pairs(mini_adapter, count=50, seed=0)
    images, labels = load_split("train", 16)
    assert torch.equal(pairs.x0, images[:50])
    assert pairs.prompts == [class_prompts()[i] for i in labels[:50].tolist()]
    assert pairs.x_T.shape == (50, 1, 16, 16) and torch.equal(pairs.x_T, mini_real_pairs(mini_adapter, 50, 0).x_T)


def _rows(n, value, tag):
    return Pairs(torch.full((n, 1, 2, 2), float(value)), torch.full((n, 1, 2, 2), float(value)),
                 [f"{tag}{i}" for i in range(n)])


def test_mix_loader_takes_its_share_and_resumes_exactly():
    data = MixedPairs(_rows(12, 0, "t"), _rows(9, 1, "r"), share=0.25)
    loader = MixLoader(data, batch_size=8, seed=0, rank=0, world=1)
    x_T, x0, prompts, w = loader.next()
    assert w is None  # real rows carry no guidance scale
    assert x0.shape[0] == 8 and x0[:6].eq(0).all() and x0[6:].eq(1).all()
    assert [p[0] for p in prompts] == ["t"] * 6 + ["r"] * 2
    for _ in range(3):
        loader.next()
    state = json.loads(json.dumps(loader.state()))  # checkpoints keep it as JSON
    expected = [loader.next()[2] for _ in range(4)]
    again = MixLoader(data, batch_size=8, seed=0, rank=0, world=1)
    again.load_state(state)
    assert [again.next()[2] for _ in range(4)] == expected
    with pytest.raises(Exception, match="real.share"):
        MixLoader(MixedPairs(_rows(12, 0, "t"), _rows(9, 1, "r"), share=0.01), 8, 0, 0, 1)


def test_source_data_never_makes_teacher_pairs(mini_adapter, tiny_cfg):
    cfg = tiny_cfg("real.source=data", "real.count=40")
    mini = world_named("mini")
    data = training_source(cfg, lambda: pytest.fail("teacher pairs were generated"),
                           lambda: mini.real_pairs(cfg, mini_adapter, progress=False))
    assert len(data) == 40
    mix = tiny_cfg("real.source=mix", "real.count=40")
    mixed = training_source(mix, lambda: _rows(4, 0, "t"), lambda: mini.real_pairs(mix, mini_adapter))
    assert isinstance(mixed, MixedPairs) and mixed.share == 0.5


@pytest.mark.slow
def test_distill_against_real_images(mini_adapter, tiny_cfg, tmp_path):
    from nitrofusion.training import distill

    cfg = tiny_cfg("real.source=data", "real.count=64", "adversarial.r1_weight=0.5")
    data = training_source(cfg, list, lambda: world_named("mini").real_pairs(cfg, mini_adapter))
    result = distill(cfg, mini_adapter, data, tmp_path, progress=False)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert result["images"] == 16 and all(e["r1"] > 0 for e in log)


def test_caption_folder_encodes_with_the_vae_and_caches(sdxl_adapter, tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(3):
        arr = torch.randint(0, 256, (80, 64, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}\n")
    assert [t for _, t in caption_folder(folder)] == ["caption 0", "caption 1", "caption 2"]
    pairs = folder_real_pairs(sdxl_adapter, folder, 64, progress=False)
    assert pairs.prompts == ["caption 0", "caption 1", "caption 2"]
    assert pairs.x0.shape == (3, *sdxl_adapter.latent_shape())
    # the same latents as encoding the centre 64x64 crop directly (80 rows -> rows 8..72)
    img = torch.from_numpy(np.array(Image.open(folder / "1.png"))).permute(2, 0, 1)
    img = img[:, 8:72, :].float().div(127.5).sub(1).unsqueeze(0)
    with torch.no_grad():
        ref = sdxl_adapter.vae.encode(img).latent_dist.mean * sdxl_adapter.vae.config.scaling_factor
    torch.testing.assert_close(pairs.x0[1:2], ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(sdxl_adapter, "encode_images", lambda *a: pytest.fail("cache not used"))
    assert torch.equal(folder_real_pairs(sdxl_adapter, folder, 64, progress=False).x0, pairs.x0)


def test_caption_folder_errors(tmp_path):
    from nitrofusion.errors import NitroFusionError

    (tmp_path / "a.png").write_bytes(b"not an image")
    with pytest.raises(NitroFusionError, match="a.png in .* has no caption: add a.txt"):
        caption_folder(tmp_path)
    with pytest.raises(NitroFusionError, match="real.data folder not found"):
        caption_folder(tmp_path / "missing")


def test_r1_penalty_hand_computed():
    # D(f) = 1/2 sum f^2 over both inputs: grad = f, so the penalty is ||f_1||^2 + ||f_2||^2 per sample
    f1, f2 = torch.tensor([[1.0, 2.0], [0.0, 3.0]]), torch.tensor([[[2.0]], [[1.0]]])
    pen = r1_penalty(lambda fs: 0.5 * (fs[0].pow(2).sum(1) + fs[1].pow(2).flatten(1).sum(1)), [f1, f2])
    assert pen.tolist() == [1 + 4 + 4, 9 + 1]
    # D(f) = w.f: grad = w whatever f is, and the penalty is differentiable in w (the heads learn from it)
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    pen = r1_penalty(lambda fs: fs[0] @ w, [f1])
    assert pen.tolist() == [25.0, 25.0]
    pen.sum().backward()
    assert w.grad.tolist() == [2 * 2 * 3.0, 2 * 2 * 4.0]


def test_precision_recall_coverage_hand_computed():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])  # k=1: every real radius is 1
    fake = torch.tensor([[0.5], [10.0]])  # radius of each fake = 9.5
    assert knn_radii(real, 1).tolist() == [1.0] * 5
    r = precision_recall_coverage(real, fake, k=1)
    assert r == {"precision": 0.5, "recall": 1.0, "coverage": 0.4}  # coverage: balls of 0 and 1 hold 0.5
    labels = torch.tensor([0, 0, 0, 1, 1])
    cover = per_class_coverage(real, labels, fake, torch.tensor([0, 1]), classes=3, k=1)
    assert cover == [2 / 3, 0.0, None]  # class 0 balls {0, 1, 2} radius 1: 0.5 hits 0 and 1


@pytest.mark.parametrize("sets, needle", [
    (["multistep.p=1.5"], "multistep.p must be >= 0 and <= 1 (got 1.5)"),
    (["multistep.timesteps=[1200, 499]"], "multistep.timesteps must be >= 0 and <= 999 (got 1200)"),
    (["multistep.timesteps=[499, 749]"], "multistep.timesteps must decrease"),
    (["adversarial.r1_weight=-1"], "adversarial.r1_weight must be >= 0 (got -1"),
    (["real.share=1.5"], "real.share must be > 0 and < 1 (got 1.5)"),
    (["world=sdxl", "teacher=/x", "real.source=data"], "real.source 'data' needs real images: set real.data"),
    (["real.source=mix", "real.data=/imgs"], "real.data applies to the pipeline worlds"),
])
def test_bad_values_are_one_line_errors_naming_the_key(sets, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["distill", "--out", "X"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
