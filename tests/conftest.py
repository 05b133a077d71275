import os

import pytest
import torch

# The suite runs in 2 pytest-xdist workers on a 2-core machine (README's test command): one torch thread each keeps
# the cores busy without oversubscribing them. Run serially (no -n), a test process gets up to 2 threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(items):
    # The slow end-to-end tests first, so the two workers finish together instead of one waiting on the last long test
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # Text encodings and teacher pairs go to a per-session cache, never the user's.
    os.environ["NITROFUSION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # accelerate keeps one process-wide state; each test is its own "process" (mixed precision may differ)
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_teacher(_cache_dir):
    from nitrofusion.sampling.teacher import SamplerSpec
    from nitrofusion.worlds.mini.models import MiniUNetConfig, build_noise_scheduler, build_unet
    from nitrofusion.worlds.mini.teacher import MiniTeacher

    torch.manual_seed(0)
    model = MiniUNetConfig(block_out_channels=[16, 16, 32], norm_num_groups=8)
    unet = build_unet(model).eval().requires_grad_(False)
    return MiniTeacher(unet=unet, scheduler_config=dict(build_noise_scheduler().config),
                       sampler=SamplerSpec(name="ddim", steps=2, guidance_scale=2.0), model=model)


@pytest.fixture(scope="session")
def mini_adapter(tiny_teacher):
    from nitrofusion.worlds.mini.adapter import MiniAdapter

    return MiniAdapter(tiny_teacher)


@pytest.fixture()
def tiny_cfg():
    from nitrofusion import config
    from nitrofusion.distill_config import DistillConfig

    def make(*overrides):
        return config.build(DistillConfig, "distill", "tiny", list(overrides))

    return make


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A random-weight SDXL pipeline folder (3-block SDXL layout, offline tokenizers)."""
    from nitrofusion.worlds.sdxl.testing import build_random_sdxl

    return build_random_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe", "tiny", seed=0)


@pytest.fixture(scope="session")
def sdxl_adapter(tiny_sdxl):
    from nitrofusion.worlds.sdxl.adapter import SDXLAdapter, SDXLConfig

    return SDXLAdapter(tiny_sdxl, SDXLConfig(resolution=64))


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cat\na photo of a dog\n\nan astronaut riding a horse\n")
    return path
