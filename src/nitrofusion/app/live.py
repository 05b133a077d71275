"""`nitrofusion app`: a live demo of a student, one image per click in 1-4 steps (gradio).

Binds to 127.0.0.1 unless told otherwise (`--host 0.0.0.0` exposes it to the network on purpose); never
opens a public share link. Works for mini-world runs (instant on a CPU) and SDXL models (anything
`nitrofusion generate` accepts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from ..errors import NitroFusionError, describe
from ..sampling.spec import check_seed, check_steps

Generate = Callable[[str, int, int], Image.Image]


LIVE_SIZE = 512  # SDXL images while typing: 1 step at 512x512 keeps up with a typist on a GPU


def make_generator(model: str | Path, base: str | None = None, shift: int | None = None, device: str = "cpu",
                   dtype: torch.dtype | None = None, fast: bool = False, vae: str | None = None,
                   vae_dtype: torch.dtype | None = None, size: int | None = LIVE_SIZE) -> tuple[Generate, list[str]]:
    """(prompt, steps, seed) -> image, and example prompts; the model loads once, here, through its world.
    `fast` / `vae`: the UNet families (SDXL, SD; fast.py); `size` (pixels; None = the run's resolution): not mini."""
    from ..worlds import GenerateOptions, world_of_model

    options = GenerateOptions(base=base, shift=shift, device=device, dtype=dtype, fast=fast, vae=vae,
                              vae_dtype=vae_dtype)
    return world_of_model(model).live_generator(Path(model), options, size)


def build_app(generate_fn: Generate, examples: list[str], title: str = "nitrofusion"):
    import gradio as gr

    def on_click(prompt: str, steps: float, seed: float):
        if not prompt or not prompt.strip():
            raise gr.Error("type a prompt")
        try:
            steps, seed = int(steps), int(seed)
            check_steps(steps)
            check_seed(seed)
            t0 = time.perf_counter()
            image = generate_fn(prompt, steps, seed)
        except (NitroFusionError, ValueError, OverflowError) as e:  # the visitor's input: say so on the page
            raise gr.Error(str(e)) from None
        return image, f"“{prompt.strip()}”: {steps} step(s), seed {seed}, {1000 * (time.perf_counter() - t0):.0f} ms"

    def on_type(prompt: str, steps: float, seed: float):
        if not prompt or not prompt.strip():  # half-typed: keep the last image
            return gr.skip(), gr.skip()
        try:
            return on_click(prompt, steps, seed)
        except gr.Error:  # a bad field while typing shows nothing; the button says why
            return gr.skip(), gr.skip()

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}: one-step generation (1-4 steps with the same weights)")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", value=examples[0] if examples else "")
                steps = gr.Slider(1, 4, value=1, step=1, label="steps")
                seed = gr.Number(value=0, precision=0, label="seed")
                button = gr.Button("generate", variant="primary")
                gr.Examples(examples, inputs=prompt)
            with gr.Column():
                image = gr.Image(label="image", type="pil")
                info = gr.Markdown()
        # one named endpoint (/generate) for the button, the Enter key and API clients
        button.click(on_click, [prompt, steps, seed], [image, info], api_name="generate")
        prompt.submit(on_click, [prompt, steps, seed], [image, info], api_name=False)
        # live: a new image as the visitor types. always_last is the debounce: while this tab's image is being
        # made, keystrokes only replace its one pending request, so a fast typist never floods the queue, and
        # the shared queue (one worker, first come first served) takes the tabs' latest prompts in turn
        live = dict(trigger_mode="always_last", show_progress="hidden", api_name=False)
        prompt.input(on_type, [prompt, steps, seed], [image, info], **live)
        steps.change(on_type, [prompt, steps, seed], [image, info], **live)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    # share=False always: a public tunnel is never opened implicitly
    try:
        # quiet: no share-link hint (we never share) and no second URL line (the CLI prints where it serves)
        return demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                           quiet=True)
    except OSError as e:  # gradio: "Cannot find empty port ..." when the port is taken
        raise NitroFusionError(f"cannot serve on {host}:{port or 7860} ({describe(e)}); choose another "
                               "--port") from None
