"""`nitrofusion demo`: the whole method on the embedded mini world."""

from __future__ import annotations

from pathlib import Path

from .common import distill_config, output_folder


def cmd_demo(args) -> None:
    extra = [f"max_minutes={args.minutes}"] if args.minutes is not None else []
    extra += [f"max_images={args.images}"] if args.images is not None else []
    cfg = distill_config(args, extra)  # checked before torch and diffusers load (seconds)
    output_folder(args.out)
    from ..studies.demo import run_demo

    report = run_demo(Path(args.out), cfg, eval_samples=args.eval_samples, resume=args.resume)
    t, s = report["teacher"], report["student"]
    print(f"teacher ({t['sampler']}): classifier-FID {t['fid']:.2f}, accuracy {t['accuracy']:.3f}")
    print(f"teacher forced to 1 step: classifier-FID {report['teacher_one_step']['fid']:.2f}, "
          f"accuracy {report['teacher_one_step']['accuracy']:.3f}")
    for k, m in s.items():
        print(f"student {k} step(s): classifier-FID {m['fid']:.2f}, accuracy {m['accuracy']:.3f}, "
              f"precision {m['precision']:.3f}, recall {m['recall']:.3f}")
    print(f"report: {Path(args.out) / 'report.md'} ({report['timing']['total_seconds']:.0f} s in all)")

