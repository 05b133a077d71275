"""The guidance-knob study (docs/studies/guidance.md): a guided student against its teacher at each w.

For every w: `nitrofusion evaluate --model teacher --guidance w` (the teacher's held-out samples at w) and
`nitrofusion evaluate --model RUN --guidance w` for every run (seed) of every group; an evaluation already in the
work folder is read, not redone, so the study resumes. Writes each group's per-w table (the teacher, and the
students' mean and standard deviation over seeds at each step count) as JSON and markdown, and the
precision/recall plot (one step, every group, beside the teacher).

    python scripts/guidance_study.py --group mini-guided runs/guided-s0 runs/guided-s1 runs/guided-s2 \
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
    """One group of runs (seeds of one recipe) against the teacher at every w."""
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


def plot(groups: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (pr, acc, fid) = plt.subplots(1, 3, figsize=(15, 4))
    result = next(iter(groups.values()))
    ws = [row["w"] for row in result["rows"]]
    pr.plot([r["teacher"]["recall"] for r in result["rows"]], [r["teacher"]["precision"] for r in result["rows"]],
            "o-", color="black", label="teacher (8 steps, CFG w)")
    fid.plot(ws, [r["teacher"]["fid"] for r in result["rows"]], "o-", color="black", label="teacher")
    acc.plot(ws, [r["teacher"]["accuracy"] for r in result["rows"]], "o-", color="black", label="teacher")
    for (name, group), color in zip(groups.items(), ("tab:red", "tab:blue", "tab:green", "tab:purple"),
                                    strict=False):
        m = [r["student"]["1"] for r in group["rows"]]
        label = f"{name}, 1 step (n={m[0]['fid']['n']})"
        pr.errorbar([x["recall"]["mean"] for x in m], [x["precision"]["mean"] for x in m],
                    xerr=[x["recall"]["std"] for x in m], yerr=[x["precision"]["std"] for x in m], fmt="s-",
                    color=color, label=label, capsize=2)
        for axis, key in ((acc, "accuracy"), (fid, "fid")):
            axis.errorbar(ws, [x[key]["mean"] for x in m], yerr=[x[key]["std"] for x in m], fmt="s-", color=color,
                          label=label, capsize=2)
    for r in result["rows"]:
        pr.annotate(f"w={r['w']:g}", (r["teacher"]["recall"], r["teacher"]["precision"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    pr.set(xlabel="recall", ylabel="precision", title="precision / recall as w varies")
    acc.set(xlabel="guidance scale w", ylabel="prompt accuracy", title="prompt accuracy (fidelity to the class)")
    fid.set(xlabel="guidance scale w", ylabel="classifier-FID", title="classifier-FID to real test images")
    for axis in (pr, acc, fid):
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", nargs="+", action="append", required=True, metavar=("LABEL", "RUN"),
                   help="a label and its guided runs (one per seed); repeat for more recipes")
    p.add_argument("--w", nargs="+", type=float, default=[1, 1.5, 2, 3, 5], help="guidance scales")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--work", required=True, help="folder for the evaluations (reused when present)")
    p.add_argument("--json", required=True)
    p.add_argument("--plot", required=True)
    a = p.parse_args()
    groups = {label: study(runs, a.w, Path(a.work), a.samples, a.steps) for label, *runs in a.group}
    Path(a.json).write_text(json.dumps(groups, indent=1) + "\n")
    plot(groups, Path(a.plot))
    for label, result in groups.items():
        print(f"\n## {label}\n\n{markdown(result)}")


if __name__ == "__main__":
    cli()
