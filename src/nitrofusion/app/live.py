"""`nitrofusion app`: a live demo of a student, one image per click in 1-4 steps (gradio).

Binds to 127.0.0.1 unless told otherwise (`--host 0.0.0.0` exposes it to the network on purpose); never
opens a public share link. Works for mini-world runs (instant on a CPU) and SDXL models (anything
`nitrofusion generate` accepts).

Under load and abuse (docs/guide/fast-inference-and-app.md, "Load and abuse") every request gets an image or a
one-line error, within these bounds:
- a prompt is text of at most MAX_PROMPT_CHARS characters (as sent); a longer one is refused, not truncated, so
  an image never silently stands for part of its prompt (the page's box stops typing at that length). The text
  encoders read less anyway: 77 CLIP tokens (SDXL, SD), 256 T5 tokens (SD3), 16 tokens (mini world).
- control characters (NUL, ESC, CR, LF, ...) become spaces and runs of whitespace one space, as the encoders'
  tokenizers treat them; a prompt left empty is refused.
- steps a whole number 1-4, seed a whole number in [0, 2**63 - 2**32]; anything else (a string, NaN, 1.5, 1e300)
  is refused in one line naming the field; a guided student's guidance slider (docs/method.md §10) takes a finite
  number inside the range it was trained on.
- one image at a time (WORKERS) and at most MAX_QUEUE requests waiting in gradio's queue: the next one gets
  gradio's "queue is full" error instead of growing the queue.
- gradio writes each image to its temp folder to serve it: every DELETE_CACHE[0] s, the files older than
  DELETE_CACHE[1] s are deleted.
- prompt embeddings: the SDXL runtime keeps the last 64 prompts (worlds/pipelines/runtime.py PROMPT_CACHE, an LRU);
  SD and SD3 keep none; the mini world keeps its ten class prompts and the last 4,096 others (worlds/mini/adapter.py).
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from ..errors import NitroFusionError, describe
from ..sampling.spec import MAX_SEED

Generate = Callable[[str, int, int], Image.Image]


LIVE_SIZE = 512  # SDXL images while typing: 1 step at 512x512 keeps up with a typist on a GPU
MAX_PROMPT_CHARS = 1000  # about what the longest encoder reads (SD3: 256 T5 tokens); at most 4 KB of UTF-8
WORKERS = 1  # images made at once: one model on one device, so more workers would only share it
MAX_QUEUE = 64  # requests waiting for the worker: 64 one-step images are a few seconds on a GPU
DELETE_CACHE = (60, 300)  # gradio's temp images: every minute, delete those older than 5 minutes


def make_generator(model: str | Path, base: str | None = None, shift: int | None = None, device: str = "cpu",
                   dtype: torch.dtype | None = None, fast: bool = False, vae: str | None = None,
                   vae_dtype: torch.dtype | None = None, size: int | None = LIVE_SIZE) -> tuple[Generate, list[str]]:
    """(prompt, steps, seed) -> image, and example prompts; the model loads once, here, through its world.
    `fast` / `vae`: the UNet families (SDXL, SD; fast.py); `size` (pixels; None = the run's resolution): not mini."""
    from ..worlds import GenerateOptions, world_of_model

    options = GenerateOptions(base=base, shift=shift, device=device, dtype=dtype, fast=fast, vae=vae,
                              vae_dtype=vae_dtype)
    return world_of_model(model).live_generator(Path(model), options, size)


def clean_prompt(prompt: object) -> str:
    """The prompt as drawn: text, at most MAX_PROMPT_CHARS characters, control characters as spaces, whitespace
    runs as one space (the tokenizers do the same), not empty."""
    if prompt is not None and not isinstance(prompt, str):
        raise NitroFusionError(f"the prompt must be text (got {type(prompt).__name__}): send a string")
    if prompt and len(prompt) > MAX_PROMPT_CHARS:
        raise NitroFusionError(f"the prompt is {len(prompt):,} characters, over the limit of {MAX_PROMPT_CHARS:,}: "
                               "shorten it")
    text = " ".join("".join(" " if unicodedata.category(c) == "Cc" else c for c in prompt or "").split())
    if not text:
        raise NitroFusionError("the prompt is empty: type a prompt")
    return text


def _short(value: object) -> str:
    """A sent value for a one-line message: 1e+300, not its 301 digits."""
    text = repr(value)
    if len(text) <= 24:
        return text
    return f"{value:.3g}" if isinstance(value, int | float) else text[:24] + "..."


def whole_number(value: object, name: str, low: int, high: int, shown_range: str) -> int:
    """An API value as an int in [low, high]: a JSON number, finite and whole (1.0 is 1; 1.5, "1", None, NaN and
    true are refused in one line that names the field)."""
    whole = (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
             and value % 1 == 0)
    if not whole or not low <= value <= high:
        raise NitroFusionError(f"{name} must be a whole number from {shown_range} (got {_short(value)})")
    return int(value)


def check_request(prompt: object, steps: object, seed: object) -> tuple[str, int, int]:
    """A visitor's (prompt, steps, seed) as the generator takes them, or a one-line NitroFusionError."""
    return (clean_prompt(prompt), whole_number(steps, "steps", 1, 4, "1 to 4"),
            whole_number(seed, "seed", 0, MAX_SEED, "0 to 2**63 - 2**32"))


def check_scale(value: object, low: float, high: float) -> float:
    """A guided student's w as sent (docs/method.md §10): a finite number inside the slider's range."""
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not number or not low <= value <= high:
        raise NitroFusionError(f"guidance must be a number from {low:g} to {high:g} (got {_short(value)})")
    return float(value)


def build_app(generate_fn: Generate, examples: list[str], title: str = "nitrofusion", max_queue: int = MAX_QUEUE):
    """The page; a guided student's generator (`generate_fn.guidance` = (w_min, w_max, default)) gets a guidance
    slider, sent to it as guidance=w."""
    import gradio as gr

    scale = getattr(generate_fn, "guidance", None)

    def on_click(prompt: object, steps: object, seed: object, *w: object):
        try:
            prompt, steps, seed = check_request(prompt, steps, seed)
            extra = {"guidance": check_scale(w[0], scale[0], scale[1])} if scale else {}
            t0 = time.perf_counter()
            image = generate_fn(prompt, steps, seed, **extra)
        except (NitroFusionError, ValueError, OverflowError) as e:  # the visitor's input: say so on the page
            # print_exception=False: a refused request is not a server fault, so no traceback in the server's log
            raise gr.Error(str(e), print_exception=False) from None
        at = f", guidance {extra['guidance']:g}" if extra else ""
        return image, f"“{prompt}”: {steps} step(s){at}, seed {seed}, {1000 * (time.perf_counter() - t0):.0f} ms"

    def on_type(prompt: object, steps: object, seed: object, *w: object):
        try:
            return on_click(prompt, steps, seed, *w)
        except gr.Error:  # half-typed or a bad field: keep the last image; the button says why
            return gr.skip(), gr.skip()

    with gr.Blocks(title=title, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"## {title}: one-step generation (1-4 steps with the same weights)")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="prompt", value=examples[0] if examples else "", max_length=MAX_PROMPT_CHARS)
                steps = gr.Slider(1, 4, value=1, step=1, label="steps")
                knob = [gr.Slider(scale[0], scale[1], value=scale[2], step=0.1, label="guidance")] if scale else []
                seed = gr.Number(value=0, precision=0, label="seed")
                button = gr.Button("generate", variant="primary")
                gr.Examples(examples, inputs=prompt)
            with gr.Column():
                image = gr.Image(label="image", type="pil")
                info = gr.Markdown()
        # preprocess=False: the values come to check_request as sent, so a bad one through the API (a string,
        # None, NaN) is our one-line error rather than a TypeError inside gradio's Slider / Number
        inputs, outputs, raw = [prompt, steps, seed, *knob], [image, info], dict(preprocess=False)
        # one named endpoint (/generate) for the button, the Enter key and API clients
        button.click(on_click, inputs, outputs, api_name="generate", **raw)
        prompt.submit(on_click, inputs, outputs, api_name=False, **raw)
        # live: a new image as the visitor types. always_last is the debounce: while this tab's image is being
        # made, keystrokes only replace its one pending request, so a fast typist never floods the queue, and
        # the shared queue (one worker, first come first served) takes the tabs' latest prompts in turn
        live = dict(trigger_mode="always_last", show_progress="hidden", api_name=False, **raw)
        prompt.input(on_type, inputs, outputs, **live)
        steps.change(on_type, inputs, outputs, **live)
        for slider in knob:
            slider.change(on_type, inputs, outputs, **live)
    demo.queue(default_concurrency_limit=WORKERS, max_size=max_queue)
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
