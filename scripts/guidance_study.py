"""The guidance-knob study (docs/studies/guidance.md): a guided student against its teacher at each w.

For every w: `nitrofusion evaluate --model teacher --guidance w` (the teacher's held-out samples at w) and
`nitrofusion evaluate --model RUN --guidance w` for every run (seed) given; an evaluation already in the work folder
is read, not redone, so the study resumes. Writes the per-w table (teacher, and the students' mean and standard
deviation over seeds at each step count) as JSON and markdown, and the precision/recall plot.

    python scripts/guidance_study.py --runs runs/guided-s0 runs/guided-s1 runs/guided-s2 \
        --work runs/guidance-eval --json docs/studies/guidance.json --plot docs/guidance.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from nitrofusion.cli import main as nitrofusion

METRICS = ("fid", "fid_to_teacher", "accuracy", "precision", "recall", "coverage")


def evaluated(model: str, w: float, out: Path, samples: int, steps: list[int]) -> dict:
    if not (out / "results.json").is_file():
        argv = ["evaluate", "--model", model, "--guidance", f"{w:g}", "--samples", str(samples), "--out", str(out)]
        if model != "teacher":
            argv += ["--steps", *map(str, steps)]
        if nitrofusion(argv) != 0:
            raise SystemExit(f"evaluate of {model} at w={w:g} failed")
    return json.loads((out / "results.json").read_text())


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "n": len(values)}


def study(runs: list[str], scales: list[float], work: Path, samples: int, steps: list[int]) -> dict:
    rows = []
    for w in scales:
        teacher = evaluated("teacher", w, work / f"teacher-w{w:g}", samples, steps)["rows"][0]
        students = [evaluated(run, w, work / f"{Path(run).name}-w{w:g}", samples, steps)["rows"] for run in runs]
        row = {"w": w, "teacher": {m: teacher[m] for m in METRICS}, "student": {}}
        for s in steps:
            at = [next(r for r in rs if r["steps"] == s) for rs in students]
            row["student"][str(s)] = {m: spread([r[m] for r in at]) for m in METRICS}
        rows.append(row)
    return {"runs": runs, "samples": samples, "steps": steps, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| w | model | classifier-FID | FID to teacher | accuracy | precision | recall | coverage |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        t = row["teacher"]
        lines.append(f"| {row['w']:g} | teacher | {t['fid']:.2f} | - | {t['accuracy']:.3f} | {t['precision']:.3f} | "
                     f"{t['recall']:.3f} | {t['coverage']:.3f} |")
        for s, m in row["student"].items():
            cells = [f"{m[k]['mean']:.{d}f} ± {m[k]['std']:.{d}f}" for k, d in zip(METRICS, (2, 2, 3, 3, 3, 3),
                                                                                  strict=True)]
            lines.append(f"| {row['w']:g} | student, {s} step{'s' if s != '1' else ''} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (pr, fid) = plt.subplots(1, 2, figsize=(10, 4))
    ws = [row["w"] for row in result["rows"]]
    pr.plot([r["teacher"]["recall"] for r in result["rows"]], [r["teacher"]["precision"] for r in result["rows"]],
            "o-", color="black", label="teacher (8 steps, CFG w)")
    fid.plot(ws, [r["teacher"]["fid"] for r in result["rows"]], "o-", color="black", label="teacher")
    for s, color in zip(result["steps"], ("tab:red", "tab:blue", "tab:green", "tab:purple"), strict=False):
        m = [r["student"][str(s)] for r in result["rows"]]
        label = f"student, {s} step{'s' if s != 1 else ''}"
        pr.errorbar([x["recall"]["mean"] for x in m], [x["precision"]["mean"] for x in m],
                    xerr=[x["recall"]["std"] for x in m], yerr=[x["precision"]["std"] for x in m], fmt="s-",
                    color=color, label=label, capsize=2)
        fid.errorbar(ws, [x["fid"]["mean"] for x in m], yerr=[x["fid"]["std"] for x in m], fmt="s-", color=color,
                     label=label, capsize=2)
    for r in result["rows"]:
        pr.annotate(f"w={r['w']:g}", (r["teacher"]["recall"], r["teacher"]["precision"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    pr.set(xlabel="recall", ylabel="precision", title="precision / recall as w varies")
    fid.set(xlabel="guidance scale w", ylabel="classifier-FID", title="classifier-FID to real test images")
    pr.legend(fontsize=8)
    fid.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="guided runs (one per seed)")
    p.add_argument("--w", nargs="+", type=float, default=[1, 1.5, 2, 3, 5], help="guidance scales")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--work", required=True, help="folder for the evaluations (reused when present)")
    p.add_argument("--json", required=True)
    p.add_argument("--plot", required=True)
    a = p.parse_args()
    result = study(a.runs, a.w, Path(a.work), a.samples, a.steps)
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, Path(a.plot))
    print(markdown(result))


if __name__ == "__main__":
    cli()
