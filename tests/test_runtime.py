"""The SDXL runtime (runtime.py) gives the stock pipeline's images bit for bit, keeps recent prompts, and replays
its networks from graphs correctly (cuda_graphs.py; on a CPU with a stand-in capture that has a graph's semantics:
outputs live in static buffers that the next replay overwrites)."""

import numpy as np
import pytest
import torch

from nitrofusion.worlds.pipelines.cuda_graphs import GraphedCall
from nitrofusion.worlds.pipelines.pipeline import generate_images, image_generators, load_pipeline
from nitrofusion.worlds.pipelines.runtime import SDXLRuntime, runtime_for

PROMPTS = ["a red cat", "a photo of a dog on a beach"]


def _stock(pipe, prompts, steps, seed, px):
    return np.stack([np.asarray(im) for im in pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=0.0,
                                                   height=px, width=px, output_type="pil",
                                                   generator=image_generators(seed, 0, len(prompts))).images])


def _ours(runtime, prompts, steps, seed, px):
    return np.stack([np.asarray(im) for im in runtime(prompts, steps, image_generators(seed, 0, len(prompts)), px,
                                                      px)])


def graph_like_capture(log: list):
    """Records fn once on the static inputs; a replay recomputes from the static inputs INTO the same output
    tensors, as a CUDA graph does (so a missing input copy or a kept output shows as a wrong image)."""

    def capture(fn, static_inputs):
        log.append(tuple(tuple(a.shape) for a in static_inputs))
        outputs = fn(*static_inputs)

        def replay():
            fresh = fn(*static_inputs)
            for out, new in zip(outputs if isinstance(outputs, tuple) else (outputs,),
                                fresh if isinstance(fresh, tuple) else (fresh,), strict=True):
                out.copy_(new)

        return replay, outputs

    return capture


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_runtime_gives_the_pipelines_images_bit_for_bit(tiny_sdxl, dtype):
    """1-4 steps (the 2-4 step rows re-noise from the generators), two prompts, two sizes; fp16 as on a GPU (SDXL's
    VAE then decodes in fp32, as the stock pipeline's per-call upcast does)."""
    stock = load_pipeline(tiny_sdxl, shift=250, dtype=dtype)
    runtime = SDXLRuntime(load_pipeline(tiny_sdxl, shift=250, dtype=dtype))
    # fp16 is emulated on a CPU (slow): fewer cases there, still 1 and 4 steps at two sizes
    cases = ((1, 64), (2, 32), (3, 64), (4, 64)) if dtype == torch.float32 else ((1, 32), (4, 64))
    for steps, px in cases:
        a, b = _stock(stock, PROMPTS, steps, 7, px), _ours(runtime, PROMPTS, steps, 7, px)
        assert a.shape == (2, px, px, 3) and a.dtype == np.uint8 and np.array_equal(a, b), (steps, px)


def test_generate_images_runs_sdxl_through_the_runtime(tiny_sdxl):
    pipe = load_pipeline(tiny_sdxl, shift=250)
    images = generate_images(pipe, PROMPTS, 2, seed=3, batch_size=1)
    assert pipe.nitrofusion_runtime is runtime_for(pipe)
    stock = load_pipeline(tiny_sdxl, shift=250)
    for i, image in enumerate(images):  # batch 1: image i from seed 3 + i
        expected = stock(prompt=PROMPTS[i], num_inference_steps=2, guidance_scale=0.0,
                         generator=image_generators(3, i, 1), output_type="pil").images[0]
        assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_recent_prompts_skip_the_text_encoders(tiny_sdxl):
    runtime = SDXLRuntime(load_pipeline(tiny_sdxl, shift=250), prompt_cache=2)
    calls = []
    encode = runtime.encode_ids
    runtime.encode_ids = lambda *ids: calls.append(1) or encode(*ids)
    first = _ours(runtime, PROMPTS[:1], 1, 0, 32)
    other_seed = _ours(runtime, PROMPTS[:1], 1, 1, 32)
    assert len(calls) == 1 and not np.array_equal(first, other_seed)
    _ours(runtime, ["b"], 1, 0, 32), _ours(runtime, ["c"], 1, 0, 32)  # evicts the oldest (capacity 2)
    assert len(calls) == 3 and list(runtime.cached) == [("b",), ("c",)]
    assert np.array_equal(_ours(runtime, PROMPTS[:1], 1, 0, 32), first) and len(calls) == 4


def test_graph_replay_gives_the_same_images(tiny_sdxl):
    """Every network replayed from a graph (text encoders, UNet, decoder; one capture per shape): the same images
    as without graphs at 1-4 steps, two sizes and batch sizes; cached prompts survive later replays."""
    captured = []
    plain = SDXLRuntime(load_pipeline(tiny_sdxl, shift=250))
    graphed = SDXLRuntime(load_pipeline(tiny_sdxl, shift=250), capture=graph_like_capture(captured))
    assert graphed.graphed and not plain.graphed
    for prompts, steps, px in ((PROMPTS, 1, 64), (PROMPTS[:1], 4, 64), (PROMPTS, 2, 32), (["another"], 3, 32),
                               (PROMPTS, 1, 64)):
        assert np.array_equal(_ours(plain, prompts, steps, 5, px), _ours(graphed, prompts, steps, 5, px))
    # encoders at batch 2 and 1; UNet and decoder at (batch 2, 64), (1, 64), (2, 32), (1, 32): each recorded once
    assert len(captured) == 2 + 4 + 4
    assert torch.equal(graphed.cached[tuple(PROMPTS)][0], plain.cached[tuple(PROMPTS)][0])


def test_a_failed_capture_runs_without_a_graph_in_one_line():
    def broken(fn, static_inputs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    logs = []
    call = GraphedCall(lambda x: x * 2, "UNet", broken, logs.append)
    for _ in range(3):
        assert torch.equal(call(torch.ones(2, 3)), torch.full((2, 3), 2.0))
    assert logs == ["CUDA graph: UNet at 2x3 runs without a graph (RuntimeError: operation not permitted when "
                    "stream is capturing)"]


def test_a_graph_copies_new_inputs_and_records_each_signature_once():
    captured = []
    call = GraphedCall(lambda x, y: (x + y, x * y), "f", graph_like_capture(captured))
    s, p = call(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    assert s.tolist() == [4.0, 6.0] and p.tolist() == [3.0, 8.0]
    s2, _ = call(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert s2 is s and s.tolist() == [1.0, 2.0]  # the static output, overwritten by the replay
    call(torch.ones(3), torch.ones(3))
    call(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert captured == [((2,), (2,)), ((3,), (3,)), ((3,), (3,))]
