"""A small Dockerfile reader for lint-level checks: instructions, stages, inheritance, ignore file.

It handles what deploy/Dockerfile uses: comments, `\\` continuations, `ARG` before the first
FROM with defaults, `FROM x AS name`, exec-form (JSON) ENTRYPOINT/CMD. It is not a BuildKit
parser (no heredocs, no escape directive); a construct it does not know fails loudly.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field


@dataclass
class Instruction:
    keyword: str  # upper case
    value: str  # the rest of the (joined) line
    line: int  # 1-based line where it starts


@dataclass
class Stage:
    base: str  # FROM's image, ARGs substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def last(self, keyword: str) -> Instruction | None:
        found = [i for i in self.instructions if i.keyword == keyword]
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}")

    def parent(self, stage: Stage) -> Stage | None:
        names = [s.name for s in self.stages[: self.stages.index(stage)]]
        return self.stage(stage.base) if stage.base in names else None

    def resolve(self, name: str, keyword: str) -> list[str] | str | None:
        """Effective ENTRYPOINT/CMD (parsed exec form) or USER of stage `name`, inherited."""
        stage: Stage | None = self.stage(name)
        while stage is not None:
            inst = stage.last(keyword)
            if inst is not None:
                if keyword in ("ENTRYPOINT", "CMD"):
                    return exec_form(inst)
                return inst.value
            stage = self.parent(stage)
        return None


def exec_form(inst: Instruction) -> list[str]:
    """The JSON array of an exec-form instruction; shell form is an error here."""
    try:
        value = json.loads(inst.value)
    except json.JSONDecodeError:
        raise AssertionError(f"line {inst.line}: {inst.keyword} is not in exec form (a JSON array): {inst.value!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AssertionError(f"line {inst.line}: {inst.keyword} must be a JSON array of strings")
    return value


def _instructions(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continuation is dropped by Docker
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(p for p in buf if p)
        buf = []
        keyword, _, value = joined.partition(" ")
        if "<<" in value and re.search(r"<<-?\w", value):
            raise AssertionError(f"line {start}: heredocs are not supported by this reader")
        out.append(Instruction(keyword.upper(), value.strip(), start))
    if buf:
        raise AssertionError("Dockerfile ends inside a line continuation")
    return out


def _substitute(value: str, args: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        key = m.group(1) or m.group(2)
        if key not in args:
            raise AssertionError(f"${key} is used in FROM but no ARG with a default defines it")
        return args[key]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, value)


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for inst in _instructions(text):
        if inst.keyword == "FROM":
            words = [w for w in inst.value.split() if not w.startswith("--platform")]
            base = _substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif not stages:
            if inst.keyword != "ARG":
                raise AssertionError(f"line {inst.line}: only ARG may come before the first FROM")
            key, _, default = inst.value.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(inst)
    if not stages:
        raise AssertionError("no FROM in the Dockerfile")
    return Dockerfile(global_args, stages)


def copy_sources(inst: Instruction) -> tuple[list[str], str | None]:
    """(sources, --from stage or None) of a COPY/ADD instruction (shell-word form only)."""
    words = inst.value.split()
    from_stage = None
    plain = []
    for w in words:
        if w.startswith("--from="):
            from_stage = w.split("=", 1)[1]
        elif w.startswith("--"):
            continue
        else:
            plain.append(w)
    if inst.value.lstrip().startswith("["):
        plain = json.loads(inst.value)
    return plain[:-1], from_stage


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether a context path is left out by .dockerignore rules (last matching rule wins).

    Handles what deploy/Dockerfile.dockerignore uses: `*`, `!name`, `!dir/`, `**/x`.
    """
    excluded = False
    parts = path.strip("/").split("/")
    for raw in patterns:
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if pat.startswith("**/"):
            sub = pat[3:]
            match = any(fnmatch.fnmatchcase(p, sub) for p in parts)
        else:
            # a rule matches the path itself or any parent directory of it
            match = any(fnmatch.fnmatchcase("/".join(parts[: i + 1]), pat) for i in range(len(parts)))
        if match:
            excluded = not negate
    return excluded
