"""The docs cannot drift from the code: every `nitrofusion` command in a fenced block of README.md, the guides
(docs/guide/) and the study pages (docs/studies/) parses with the real command line, and every command that
builds a config (a preset, --set, --config) builds and validates it as the command itself would, without loading
a model. README.md stays a front door (at most 300 lines, its honest limits at most 25), and every relative link
or image in README.md and docs/ resolves."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMAND_DOCS = [README, *sorted((ROOT / "docs" / "guide").glob("*.md")),
                *sorted((ROOT / "docs" / "studies").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")


def fenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) inside fenced code blocks, backslash continuations joined onto their first line."""
    out, inside, pending, first = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        first = first if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, " ".join((pending + line).split())))
        pending = ""
    return out


def nitrofusion_argvs(line: str) -> list[list[str]]:
    """The arguments after `nitrofusion` of each command in a documented line (`a && b` is two commands); none
    for any other command (bash, pip, python, ...) or for code. Leading VAR=value assignments are skipped;
    `accelerate launch ... -m nitrofusion ARGS` gives ARGS."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    commands, current = [], []
    for word in [*words, "&&"]:
        if word in ("&&", "||", ";"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    found = []
    for words in commands:
        while words and ENV_ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words[:1] == ["nitrofusion"]:
            found.append(words[1:])
        elif words[:2] == ["accelerate", "launch"]:
            starts = [i for i in range(2, len(words) - 1) if words[i:i + 2] == ["-m", "nitrofusion"]]
            assert starts, f"`{line}` launches something other than `-m nitrofusion`"
            found.append(words[starts[0] + 2:])
    return found


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where: FILE:LINE, the command line, its nitrofusion arguments) for every documented command."""
    found = []
    for doc in COMMAND_DOCS:
        for number, line in fenced_lines(doc.read_text()):
            found += [(f"{doc.relative_to(ROOT)}:{number}", line, argv) for argv in nitrofusion_argvs(line)]
    return found


def parse(argv: list[str]):
    from nitrofusion.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's answer to an unknown flag, a missing option or --help
        raise AssertionError(f"the command line refuses it (exit {e.code}): {err.getvalue().strip()}") from None


def check_config(args) -> None:
    """Build and validate the config the command would build, as it builds it (commands/*.py); no model loads."""
    from nitrofusion import config as config_lib
    from nitrofusion.commands.common import RESUMABLE_KEYS, distill_config, model_args
    from nitrofusion.distill_config import DistillConfig

    if getattr(args, "config", None) and not (ROOT / args.config).is_file():
        args.config = None  # an example path: the preset and every --set are still checked
    if args.command == "distill":
        if args.resume and not (args.preset or args.config):  # the run folder's own config.yaml, and changes to
            keys = [item.split("=", 1)[0].strip() for item in args.overrides]  # how long it trains only
            refused = [k for k in keys if k not in RESUMABLE_KEYS]
            assert not refused, f"--resume refuses to change {refused}; it may change only {RESUMABLE_KEYS}"
        distill_config(args, model_args(args))  # a resume's values, checked against the default preset
    elif args.command == "pairs":
        distill_config(args, model_args(args) + ([f"pairs.dir={args.out}"] if args.out else []))
    elif args.command == "demo":
        extra = [f"max_minutes={args.minutes}"] if args.minutes is not None else []
        distill_config(args, extra + ([f"max_images={args.images}"] if args.images is not None else []))
    elif args.command == "teacher":
        from nitrofusion.worlds.mini.config import TeacherTrainConfig

        config_lib.build(TeacherTrainConfig, "teacher", args.preset or args.default_preset, args.overrides,
                         args.config)
    elif args.command == "bench" and args.overrides:
        preset = "mini" if args.size == "mini" else "sdxl-realism"  # what the bench builds for that size
        config_lib.build(DistillConfig, "distill", preset, args.overrides)
    elif args.command == "ablate":
        variants = ablation_variants()
        unknown = [v for v in args.variants or [] if v not in variants]
        assert not unknown, f"unknown ablation variant(s) {unknown}"
        config_lib.build(DistillConfig, "distill", "mini", args.overrides)
        for name in args.variants or []:
            preset, sets = variants[name][:2]
            config_lib.build(DistillConfig, "distill", preset,
                             [*args.overrides, *sets, f"max_images={args.budget}", "max_minutes=0"])


def ablation_variants() -> dict:
    import importlib

    for module in ("nitrofusion.studies.ablate", "nitrofusion.ablate"):  # wherever the package layout keeps it
        with contextlib.suppress(ModuleNotFoundError):
            return importlib.import_module(module).VARIANTS
    raise AssertionError("no ablate module defines VARIANTS")


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    docs = {where.split(":")[0] for where, _, _ in COMMANDS}
    assert "README.md" in docs and any(d.startswith("docs/guide/") for d in docs), docs
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("where,line,argv", COMMANDS, ids=[f"{w}:{' '.join(a[:1])}" for w, _, a in COMMANDS])
def test_documented_command_parses_and_its_config_validates(where, line, argv):
    from nitrofusion.errors import NitroFusionError

    problem = None
    try:
        check_config(parse(argv))
    except (AssertionError, NitroFusionError) as e:
        problem = str(e)
    if problem:
        pytest.fail(f"{where}: `{line}`: {problem}", pytrace=False)


def _section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = lines[start + 1:end]
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    return body


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 300, f"README.md has {len(text.splitlines())} lines; move detail to docs/"
    limits = _section(text, "Honest limits")
    assert 0 < len(limits) <= 25, f"README.md's Honest limits has {len(limits)} lines (at most 25)"


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _without_code(text: str) -> str:
    kept, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def test_every_relative_link_and_image_resolves():
    broken = []
    for doc in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in LINK.findall(_without_code(doc.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            path = target.split("#")[0]
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken
