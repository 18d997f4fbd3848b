"""The Dockerfile (deploy/docker/Dockerfile) as data: a small parser (line continuations,
comments, one instruction per logical line; an unknown instruction or a dangling backslash is an
AssertionError) and what the chart and image tests read from it."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments and parser directives dropped, backslash
    continuations joined (a comment line inside a continuation is skipped, as Docker does)."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        assert word.upper() in INSTRUCTIONS, f"not a Dockerfile instruction: {line!r}"
        assert word == word.upper(), f"instruction not upper case: {word}"
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def stages(instructions) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def dockerfile_instructions():
    return parse_dockerfile(DOCKERFILE.read_text())


def dockerfile_entrypoint() -> list[str]:
    final = stages(dockerfile_instructions())[-1]
    entry = [rest for ins, rest in final if ins == "ENTRYPOINT"]
    assert len(entry) == 1, "one ENTRYPOINT in the final stage"
    value = json.loads(entry[0])   # exec form: no shell between the signal and tandem
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def dockerfile_user() -> int:
    final = stages(dockerfile_instructions())[-1]
    users = [rest for ins, rest in final if ins == "USER"]
    assert users, "the final stage sets a USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric USER, so Kubernetes' runAsNonRoot can check it"
    assert int(uid) != 0
    return int(uid)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())
