"""deploy/Dockerfile, checked without a Docker engine: what it copies exists and survives the
ignore file, its run images are non-root with `modelshelf` as entrypoint, its default command
parses with the real CLI, and its build stage's wheel really carries the `modelshelf` command.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from agent.cli import build_parser, settings_from_args
from tests.deploy.dockerfile import copy_sources, dockerignore_excludes, parse_dockerfile
from tests.deploy.manifests import DEPLOY, DOCKERFILE, REPO

DF = parse_dockerfile(DOCKERFILE.read_text())
IGNORE = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
RUN_STAGES = ["agent", "embedded"]


def test_stages_and_default_target():
    names = [s.name for s in DF.stages]
    assert names[-1] == "agent", "the default target (last stage) is the sidecar agent image"
    assert set(RUN_STAGES) <= set(names)
    for s in DF.stages:
        assert s.base in names or re.match(r"^python:3\.11-slim(-\w+)?$", s.base), f"stage {s.name}: base {s.base}"


@pytest.mark.parametrize("stage", RUN_STAGES)
def test_run_image_is_non_root_with_modelshelf_entrypoint(stage, agent_env, capsys):
    user = DF.resolve(stage, "USER")
    assert user and re.fullmatch(r"[0-9]+(:[0-9]+)?", user), f"USER must be numeric (runAsNonRoot can only verify a numeric uid), got {user!r}"
    assert int(user.split(":")[0]) != 0
    assert DF.resolve(stage, "ENTRYPOINT") == ["modelshelf"]
    cmd = DF.resolve(stage, "CMD")
    try:
        args = build_parser().parse_args(cmd)
    except SystemExit:
        pytest.fail(f"default CMD {cmd} does not parse: {capsys.readouterr().err}")
    assert args.command == "run" and args.host == "0.0.0.0"
    settings_from_args(args)


def test_run_image_copies_only_from_build_stages():
    for name in RUN_STAGES:
        stage = DF.stage(name)
        for inst in stage.instructions:
            if inst.keyword in ("COPY", "ADD"):
                _, from_stage = copy_sources(inst)
                assert from_stage, f"line {inst.line}: the run image takes files only from a build stage"


def test_copied_sources_exist_and_pass_the_ignore_file():
    checked = 0
    for stage in DF.stages:
        for inst in stage.instructions:
            if inst.keyword == "ADD":
                pytest.fail(f"line {inst.line}: use COPY (ADD fetches URLs and unpacks archives)")
            if inst.keyword != "COPY":
                continue
            sources, from_stage = copy_sources(inst)
            if from_stage:
                continue
            for src in sources:
                path = REPO / src
                assert path.exists(), f"line {inst.line}: COPY {src}: not in the build context (repository root)"
                assert not dockerignore_excludes(IGNORE, src), f"line {inst.line}: {src} is excluded by Dockerfile.dockerignore"
                checked += 1
    assert checked >= 3


def test_ignore_file_keeps_the_context_small():
    for path in (".venv/bin/python", ".git/HEAD", "tests/deploy/test_dockerfile.py", "demo/x", "agent/__pycache__/cli.cpython-311.pyc"):
        assert dockerignore_excludes(IGNORE, path), path
    for path in ("agent/cli.py", "puller/cache.py", "pyproject.toml"):
        assert not dockerignore_excludes(IGNORE, path), path


def test_no_secrets_in_the_image():
    secretish = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL)", re.I)
    for stage in DF.stages:
        for inst in stage.instructions:
            if inst.keyword in ("ENV", "ARG"):
                assert not secretish.search(inst.value), f"line {inst.line}: {inst.keyword} {inst.value}"
            if inst.keyword == "COPY":
                assert not re.search(r"\.s3cfg|\.aws|\.netrc|\.env\b", inst.value), f"line {inst.line}"


def test_embedded_image_configures_mlserver_for_the_agent():
    env = " ".join(i.value for i in DF.stage("embedded").instructions if i.keyword == "ENV")
    assert "MLSERVER_PARALLEL_WORKERS=0" in env and "MLSERVER_LOAD_MODELS_AT_STARTUP=false" in env
    run = " ".join(i.value for s in DF.stages for i in s.instructions if i.keyword == "RUN")
    assert "[mlserver]" in run, "the embedded venv installs the modelshelf[mlserver] extra"


def _can_build_wheels() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("wheel", "setuptools.command.bdist_wheel"))


def test_build_stage_wheel_provides_the_entrypoint(tmp_path):
    """Do what the `wheel` stage does, in a copy of exactly what it COPYs: build the wheel, then
    check it installs the `modelshelf` console script the ENTRYPOINT runs, both packages, and the
    `mlserver` extra the embedded stage asks for. (Without build isolation: no network here;
    so the test venv needs setuptools >= 77: bdist_wheel built in, and the SPDX `license` string.)"""
    if not _can_build_wheels():
        pytest.skip("no bdist_wheel in this venv: the test extra installs setuptools>=77")
    ctx = tmp_path / "src"
    ctx.mkdir()
    stage = DF.stage("wheel")
    for inst in stage.instructions:
        if inst.keyword == "COPY":
            sources, _ = copy_sources(inst)
            for src in sources:
                path = REPO / src
                if path.is_dir():
                    shutil.copytree(path, ctx / src, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(path, ctx / src)
    run = next(i.value for i in stage.instructions if i.keyword == "RUN")
    assert run.startswith("pip wheel") and "--no-deps" in run
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--wheel-dir", str(tmp_path / "dist"), "."],
        cwd=ctx, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    wheel, = (tmp_path / "dist").glob("modelshelf-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = z.read(info).decode()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert re.search(r"^modelshelf\s*=\s*agent\.cli:main$", entry_points, re.M), entry_points
    assert "agent/cli.py" in names and "puller/__init__.py" in names
    assert not any(n.startswith(("tests/", "deploy/", "benchmarks/")) for n in names)
    assert "Provides-Extra: mlserver" in metadata
