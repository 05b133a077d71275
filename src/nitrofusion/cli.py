"""The `nitrofusion` command. Every user-facing failure is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from . import preemption, threads
from .commands.ablate import cmd_ablate
from .commands.app import cmd_app
from .commands.assets import cmd_classifier, cmd_teacher
from .commands.bench import cmd_bench
from .commands.demo import cmd_demo
from .commands.distill import cmd_distill
from .commands.evaluate import cmd_evaluate
from .commands.export import cmd_export, cmd_transfer
from .commands.generate import cmd_generate
from .commands.pairs import cmd_pairs
from .commands.presets import cmd_presets
from .errors import NitroFusionError, describe
from .quiet import quiet_dependencies

# The long commands, and how each continues after an interruption
RESUMABLE = {"distill": "rerun the same command with --resume to continue",
             "demo": "rerun the same command with --resume to continue",
             "ablate": "rerun the same command to continue (finished runs are kept, the others resume)",
             "pairs": "rerun the same command to continue (finished shards are kept)"}

DEMO_HELP = ("distil the shipped mini-world teacher into a 1-4 step student and write a report (about 5 min "
             "on 2 cores)")


def command(sub, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with the same sentence the command list shows."""
    return sub.add_parser(name, help=text, description=text)


def _add_config_args(p: argparse.ArgumentParser, default_preset: str, example: str = "pool.heads_per_slot=2",
                     resumable: bool = False) -> None:
    resume = "; with --resume: the run's own config" if resumable else ""
    p.add_argument("--preset", help=f"named preset (default: {default_preset}{resume}); see `nitrofusion presets`")
    p.set_defaults(default_preset=default_preset)
    p.add_argument("--config", help="YAML file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override any config value, e.g. --set {example} (repeatable)")


def _fast_args(p) -> None:
    p.add_argument("--fast", action="store_true", help="SDXL: fused QKV, channels_last and torch.compile of UNet and "
                   "VAE decoder, on a GPU also CUDA graphs and a bf16 decoder (first images at each size pay the "
                   "compile time; falls back to eager where compile cannot run)")
    p.add_argument("--vae", help="SDXL: decode with this AutoencoderTiny (e.g. TAESDXL) or AutoencoderKL folder")
    p.add_argument("--vae-dtype", help="SDXL/SD: the VAE decoder's precision, fp32, bf16 or fp16 (default: fp32 where "
                   "SDXL's VAE would overflow in fp16, bf16 instead with --fast on a GPU that has it; else --dtype)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitrofusion", description="NitroFusion: dynamic adversarial "
                                     "distillation of text-to-image diffusion models (mini world, SDXL, SD 1.x/2.x, "
                                     "SD3/3.5) into 1-4 step generators.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks (also NITROFUSION_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = command(sub, "demo", DEMO_HELP)
    _add_config_args(p, "mini-demo")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--images", type=int, help="distillation budget in training images (default: the preset's)")
    p.add_argument("--minutes", type=float, help="also stop after this many training minutes (0 = no time limit)")
    p.add_argument("--eval-samples", type=int, default=1000, help="held-out prompts/x_T for the metrics (default "
                   "1000; the study tables in docs/studies use 2000)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.set_defaults(func=cmd_demo)

    p = command(sub, "distill", "run NitroFusion distillation (mini world, SDXL, SD 1.x/2.x or SD3/3.5; `accelerate "
                       "launch -m nitrofusion distill` for many processes)")
    _add_config_args(p, "mini", resumable=True)
    p.add_argument("--teacher", help="teacher folder: a diffusers SDXL (sdxl presets), SD 1.x/2.x (sd15, sd21) or "
                   "SD3/3.5 (sd35-medium) pipeline, or a mini teacher")
    p.add_argument("--prompts", help="prompt source for sdxl, sd and sd3: .txt, .csv/.jsonl (prompts.column), a "
                   "datasets folder, or hf:NAME")
    p.add_argument("--out", required=True, help="run folder: config, log, checkpoints, student")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--dry-run", action="store_true", help="check everything that can be checked without training "
                   "(config, teacher folder, prompts, output folder, resume) from file headers only, print the plan "
                   "(steps, heads, trainable parameters, predicted memory) and exit; nothing is written")
    p.set_defaults(func=cmd_distill)

    p = command(sub, "pairs", "pre-generate and cache the teacher pairs a distillation preset reads "
                       "(`accelerate launch -m nitrofusion pairs` shards it over processes)")
    _add_config_args(p, "mini")
    p.add_argument("--teacher", help="teacher folder (as for distill)")
    p.add_argument("--prompts", help="prompt source (as for distill)")
    p.add_argument("--out", help="cache root, read by distill with --set pairs.dir=OUT (default: the shared "
                   "cache that distill reads by itself)")
    p.add_argument("--dry-run", action="store_true", help="check the config, teacher folder and prompts, print the "
                   "plan and exit; nothing is written")
    p.set_defaults(func=cmd_pairs)

    p = command(sub, "generate", "generate images in 1-4 steps from a run, an exported folder or a "
                       "released NitroSD UNet file")
    p.add_argument("--model", required=True, help="run folder (from distill/demo) or its student/ folder, an "
                   "exported diffusers folder, or a UNet .safetensors (with --base)")
    p.add_argument("--base", help="SDXL, SD or SD3 pipeline folder giving the text encoders and VAE (default for a "
                   "run: its teacher folder)")
    p.add_argument("--shift", type=int, help="timestep shift for a UNet file (default: its metadata or name: "
                   "realism 250, vibrant 500)")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--steps", type=int, default=1, help="1-4 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="default 0; SDXL image i uses seed + i")
    p.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt, each its own x_T (default 1)")
    p.add_argument("--height", type=int, help="SDXL: pixels (default: the run's sdxl.resolution or the UNet's)")
    p.add_argument("--width", type=int, help="SDXL: pixels (default as --height)")
    p.add_argument("--batch-size", type=int, default=4, help="SDXL: images per UNet call (default 4)")
    p.add_argument("--device", default="cpu", help="SDXL: cpu or cuda (default cpu)")
    p.add_argument("--dtype", help="SDXL: fp32 (default), fp16 or bf16")
    p.add_argument("--guidance", type=float, help="a guided student's guidance scale w (one trained with "
                   "student.guidance; default: its own)")
    _fast_args(p)
    p.add_argument("--out", required=True, help="output folder for PNG files and grid.png")
    p.set_defaults(func=cmd_generate)

    p = command(sub, "export", "export an SDXL, SD or SD3 student as a diffusers folder or an original-layout "
                       "single file (A1111/ComfyUI), or a LoRA (a LoRA run's adapters, or an SVD of student - base)")
    p.add_argument("model", help="SDXL, SD or SD3 run folder (or student folder / exported folder / UNet file with "
                   "--base)")
    p.add_argument("--format", required=True, help="diffusers, single-file or lora")
    p.add_argument("--out", required=True, help="folder (diffusers, lora) or .safetensors file (single-file); "
                   "must not exist")
    p.add_argument("--base", help="base SDXL, SD or SD3 pipeline folder (default: the run's teacher folder)")
    p.add_argument("--shift", type=int, help="timestep shift for a UNet file without one")
    p.add_argument("--rank", type=int, help="LoRA rank of the SVD extraction from a full student (e.g. 64); a LoRA "
                   "run exports its trained adapters and takes no --rank")
    p.add_argument("--dtype", help="weights dtype: fp32 (default: as trained), fp16 or bf16")
    p.add_argument("--device", default="cpu", help="LoRA: where the SVDs run (cpu or cuda)")
    p.set_defaults(func=cmd_export)

    p = command(sub, "transfer", "theta_custom + (theta_student - theta_base): a student's speed-up moved "
                       "onto a fine-tuned SDXL, SD or SD3 (docs/method.md §6)")
    for role, what in (("student", "the NitroFusion student"), ("base", "the model it was distilled from"),
                       ("custom", "the fine-tuned model to receive the delta")):
        p.add_argument(f"--{role}", required=True, help=f"{what}: run, student, pipeline or UNet/transformer "
                       "folder, or weights file (diffusers or original layout)")
    p.add_argument("--out", required=True, help="student folder (unet/ or transformer/ + scheduler/) or a "
                   ".safetensors weights file; must not exist")
    p.add_argument("--dtype", help="output dtype: fp32 (default), fp16 or bf16")
    p.set_defaults(func=cmd_transfer)

    p = command(sub, "evaluate", "fixed-seed metrics and grids of a student (or 'teacher') at 1-4 steps")
    p.add_argument("--model", required=True, help="run folder, student folder, or 'teacher' for the teacher")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="step counts, 1-4 (default 1 2 4)")
    p.add_argument("--samples", type=int, help="held-out prompts/x_T (mini default 2000); prompts or COCO "
                   "captions for SDXL (default 5000, the paper's COCO-5k)")
    p.add_argument("--seed", type=int, default=0, help="held-out set and re-noising seed")
    p.add_argument("--teacher", help="teacher folder the held-out set comes from (default: shipped)")
    p.add_argument("--guidance", type=float, help="mini: the guidance scale w of the teacher's held-out samples and "
                   "of a guided student (default: the teacher's own; a guided student's default)")
    p.add_argument("--out", required=True, help="folder for results.json, results.md, grid.png")
    g = p.add_argument_group("SDXL and SD models (run folder, exported folder, or UNet file with --base)")
    g.add_argument("--prompts", help="prompt file (.txt/.csv/.jsonl) to generate from")
    g.add_argument("--coco", help="COCO captions annotation JSON (captions_val2014.json) or a caption TSV: the "
                   "COCO-5k protocol (--samples captions, one per image, drawn with --seed)")
    g.add_argument("--reference", help="reference images folder for FID / FD-CLIP (COCO: the val2014 folder)")
    g.add_argument("--clip", help="CLIP model folder or hub id for CLIP score and FD-CLIP "
                   "(the paper's: openai/clip-vit-base-patch32)")
    g.add_argument("--inception", help="torch-fidelity Inception weights file for FID (needs torch-fidelity)")
    g.add_argument("--aesthetic", help="LAION improved-aesthetic-predictor MLP weights")
    g.add_argument("--aesthetic-clip", help="the CLIP ViT-L/14 the aesthetic predictor reads")
    g.add_argument("--image-reward", help="ImageReward checkpoint (needs the image-reward package)")
    g.add_argument("--base", help="SDXL or SD base folder (for a UNet file, or to override a run's teacher)")
    g.add_argument("--shift", type=int, help="timestep shift for a UNet file without one")
    g.add_argument("--batch-size", type=int, default=4, help="images per UNet call (default 4)")
    g.add_argument("--device", help="cuda or cpu")
    g.add_argument("--dtype", help="fp16, bf16 or fp32")
    p.set_defaults(func=cmd_evaluate)

    p = command(sub, "teacher", "train the mini-world teacher (the shipped one came from preset 'mini')")
    _add_config_args(p, "mini", example="max_iterations=2000")
    p.add_argument("--out", help="folder for the trained teacher")
    p.add_argument("--replace-shipped", action="store_true", help="overwrite the package's shipped teacher instead")
    p.set_defaults(func=cmd_teacher)

    p = command(sub, "classifier", "train the mini-world metric classifier and real-data statistics")
    p.add_argument("--out", help="folder for the classifier and the real-data statistics")
    p.add_argument("--replace-shipped", action="store_true",
                   help="overwrite the package's shipped classifier and statistics instead")
    p.add_argument("--epochs", type=int, default=6, help="passes over the Fashion-MNIST train split (default 6)")
    p.set_defaults(func=cmd_classifier)

    p = command(sub, "bench", "time one training iteration and 1-step generation at SDXL, SD3.5 or FLUX.1-dev size "
                       "(random weights): s, images/s, peak memory, TFLOP/s")
    p.add_argument("--family", choices=["sdxl", "sd3", "flux"], default="sdxl", help="sdxl (default: the "
                   "sdxl-realism preset), sd3 (sd35-medium on SD3.5 medium's architectures, T5-XXL included) or flux "
                   "(flux-dev-lora on FLUX.1-dev's architectures, T5-XXL included)")
    p.add_argument("--size", choices=["full", "tiny", "mini"], default="full", help="full: the family's real "
                   "architecture (GPU); tiny: seconds on a CPU, for tests; mini: the mini world's training step, part "
                   "by part")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--iters", type=int, default=3, help="timed repetitions per stage (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per stage first (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the family's preset, e.g. --set micro_batch=4")
    p.add_argument("--inference", action="store_true", help="instead: 1-step SDXL generation, stock diffusers eager "
                   "vs the fast path (generate --fast), at 1024 and 512 px: UNet, VAE, 1 and 4 steps, batch 8")
    p.add_argument("--dtype", help="--inference: fp16 (default on cuda), bf16 or fp32 (default on cpu)")
    p.add_argument("--memory", action="store_true", help="instead: the memory model of the family's presets (full "
                   "and LoRA students; weights, gradients, optimiser state, pool, activations), counted on the meta "
                   "device: seconds, on a CPU")
    p.add_argument("--fsdp", type=int, nargs="+", metavar="N", help="--memory: also the family's full student under "
                   "FSDP over N GPUs (fsdp=true), per GPU, e.g. --fsdp 2 4 8")
    p.add_argument("--out", help="also write the results as JSON here")
    p.set_defaults(func=cmd_bench)

    p = command(sub, "ablate", "the paper's ablation on the mini world: variants x seeds at equal "
                       "training images, 1-step metrics, table and bar plot (finished runs are skipped)")
    p.add_argument("--out", required=True, help="folder for runs/, ablation.json, ablation.md, ablation.png")
    p.add_argument("--seeds", type=int, default=3, help="runs per variant, seeds 0..N-1 (default 3)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (default 0): seeds S..S+N-1, to split one "
                   "study over several processes or machines sharing --out")
    p.add_argument("--budget", type=int, default=6400, help="training images per run (default 6400 = 200 steps)")
    p.add_argument("--eval-samples", type=int, default=1000, help="held-out prompts/x_T per score")
    p.add_argument("--variants", nargs="+", help="the paper's (default): full global-only no-refresh static "
                   "single-head; studies: hps1 hps2 hps8 refresh0.5 refresh2 one-step multistep multistep-p0.25 "
                   "multistep-extra real-data real-mix real-data-r1 real-mix-r1; the paper's own setting (with --set "
                   "teacher=RUN, a few-step run): realism realism-static realism-singlehead realism-norefresh")
    p.add_argument("--probe-every", type=int, default=0, metavar="IMAGES", help="every IMAGES training images, log "
                   "the heads' real/fake accuracy on the training pairs and on held-out teacher samples, and the "
                   "student's 1-step precision (the overfitting probe, method/probe.py); 0 = off")
    p.add_argument("--steps", nargs="+", type=int, default=[1], help="score each run at these step counts (1-4); "
                   "finished runs are re-scored for step counts they lack")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the mini preset for every variant (e.g. micro_batch=16)")
    p.set_defaults(func=cmd_ablate)

    p = command(sub, "app", "live demo in the browser: prompt in, image out in 1-4 steps (gradio)")
    p.add_argument("--model", required=True, help="run folder, exported folder, or UNet file (with --base)")
    p.add_argument("--base", help="SDXL or SD base folder (for a UNet file)")
    p.add_argument("--shift", type=int, help="timestep shift for a UNet file without one")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 exposes the demo to the network)")
    p.add_argument("--port", type=int, help="port (default: gradio's, 7860 or the next free one)")
    p.add_argument("--device", help="cuda or cpu")
    p.add_argument("--dtype", help="fp16, bf16 or fp32")
    p.add_argument("--size", type=int, help="SDXL: image side in pixels (default 512: live while typing)")
    _fast_args(p)
    p.set_defaults(func=cmd_app)

    p = command(sub, "presets", "list the named presets")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_dependencies()  # before any dependency is imported (quiet.py)
    args = build_parser().parse_args(argv)
    threads.set_default_environment()  # before torch loads: OpenMP reads it once (threads.py has the rule)
    debug = args.debug or os.environ.get("NITROFUSION_DEBUG", "") not in ("", "0")
    stoppable = args.command in RESUMABLE  # SIGTERM / SIGUSR1: checkpoint at the next safe point, exit 75
    try:
        from .sampling.spec import check_shift

        check_shift(getattr(args, "shift", None))  # every command that takes it, before any path or model is read
        with preemption.stop_on_signals() if stoppable else contextlib.nullcontext():
            args.func(args)
    except preemption.Preempted as e:
        if os.environ.get("RANK", "0") == "0":  # one line for the job, not one per rank
            print(f"nitrofusion: {e}; {RESUMABLE[args.command]} (exit code {preemption.REQUEUE_EXIT}: requeue)",
                  file=sys.stderr)
        return preemption.REQUEUE_EXIT
    except NitroFusionError as e:
        print(f"nitrofusion: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nitrofusion: interrupted" + (f"; {RESUMABLE[args.command]}" if stoppable else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`nitrofusion presets | head -1`): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second complaint at exit
        return 1
    except OSError as e:  # the file system said no (a path, a permission, a full disk): the user's to fix
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"nitrofusion: error: {e.strerror or describe(e)}{where} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - anything else is our bug: one line, the traceback on request
        if debug:
            raise
        print(f"nitrofusion: internal error ({describe(e)}); this is a bug in nitrofusion: rerun with --debug "
              "(or NITROFUSION_DEBUG=1) for the traceback and report it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
