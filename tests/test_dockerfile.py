"""The image (deploy/docker/Dockerfile), parsed here (no Docker on this machine): a non-root
numeric USER, the ENTRYPOINT the chart calls, the GPU extra, every package copied, its version
and exposed ports the chart's, and the image name it documents the chart's default."""
from __future__ import annotations

import re

import pytest

from dockerfile import (DOCKERFILE, ROOT, dockerfile_entrypoint, dockerfile_instructions, dockerfile_user,
                        parse_dockerfile, pyproject, stages)
from test_helm_chart import chart, render_docs, tandem_containers  # noqa: F401 - chart: a fixture


def test_dockerfile():
    instructions = dockerfile_instructions()
    build_args = {}
    for ins, rest in instructions:
        if ins == "FROM":
            break
        if ins == "ARG":
            name, _, default = rest.partition("=")
            build_args[name] = default.strip('"')
    images = [re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], rest.split()[0])
              for ins, rest in instructions if ins == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:[0-9.]+-runtime-ubuntu[0-9.]+", images[-1]), images
    project = pyproject()["project"]
    assert project["scripts"]["tandem"] == "tandem_cli.main:main"
    assert dockerfile_entrypoint() == ["tandem"]
    assert dockerfile_user() == 10001

    runs = " ".join(rest for ins, rest in instructions if ins == "RUN")
    assert re.search(r"""pip install ["']?\.\[gpu\]""", runs), "installs the package with its gpu extra"
    assert "gpu" in project["optional-dependencies"]
    copied = {rest.split()[0].rstrip("/") for ins, rest in instructions if ins == "COPY" and "--from" not in rest}
    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"packages not copied into the image: {sorted(packages - copied)}"
    for path in copied - {"pyproject.toml"}:
        assert (ROOT / path).exists(), path
    assert {"pyproject.toml", "README.md"} <= {w for ins, rest in instructions if ins == "COPY" for w in rest.split()}
    labels = " ".join(rest for ins, rest in stages(instructions)[-1] if ins == "LABEL")
    assert f'org.opencontainers.image.version="{project["version"]}"' in labels


def test_chart_default_image_is_the_dockerfile_one(chart):
    """The name the Dockerfile says to build is what the chart runs by default, and versions agree."""
    documented = re.findall(r"docker build -f deploy/docker/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert len(documented) == 1
    meta, values = chart.metadata, chart.values
    assert meta["appVersion"] == pyproject()["project"]["version"]
    image = f"{values['image']['repository']}:{values['image']['tag'] or meta['appVersion']}"
    assert image == documented[0]
    docs = render_docs(chart, {})
    assert {c["image"] for _, c in tandem_containers(docs)} == {documented[0]}
    assert {tuple(c["command"]) for _, c in tandem_containers(docs)} == {tuple(dockerfile_entrypoint())}


def test_exposed_ports_are_the_chart_defaults(chart):
    exposed = {int(p) for ins, rest in stages(dockerfile_instructions())[-1] if ins == "EXPOSE" for p in rest.split()}
    v = chart.values
    assert exposed == {v["router"]["port"], v["prefill"]["port"], v["prefill"]["metricsPort"],
                       v["decode"]["port"], v["decode"]["metricsPort"]}


def test_dockerfile_parser_rejects_garbage():
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM x\nRUNN echo\n")
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM x\nRUN echo \\\n")
    assert parse_dockerfile("# c\nFROM x AS b\nRUN a \\\n  # note\n  b\n") == [("FROM", "x AS b"), ("RUN", "a  b")]
