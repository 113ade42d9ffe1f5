"""Make the Triton bundled in the `nvidia-pytriton` wheel usable with the python backend.

Run as `python -m agent.runtimes.triton_setup VENV` after `pip install nvidia-pytriton` into VENV.
The wheel ships the python backend's stub per Python version under `python_backend_stubs/X.Y/`;
tritonserver looks for it in `backends/python/`. This copies the stub for the venv's Python there.
Idempotent: running it again changes nothing.
"""
from __future__ import annotations

import filecmp
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of one Triton install are."""

    root: Path  # .../site-packages/pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    @property
    def site_packages(self) -> Path:
        """The venv's site-packages (python-backend models add it to sys.path for numpy)."""
        return self.root.parent.parent


def find_install(venv: Path) -> TritonInstall:
    """The Triton install inside `venv`; FileNotFoundError naming what is missing."""
    candidates = sorted(Path(venv).glob("lib/python3*/site-packages/pytriton/tritonserver"))
    for root in candidates:
        if (root / "bin" / "tritonserver").is_file():
            return TritonInstall(root)
    raise FileNotFoundError(f"no pytriton/tritonserver/bin/tritonserver under {venv}/lib/python3*/site-packages (pip install nvidia-pytriton)")


def install_from_binary(binary: Path) -> TritonInstall:
    """The install a `tritonserver` binary belongs to (<root>/bin/tritonserver)."""
    return TritonInstall(Path(binary).resolve().parent.parent)


def _python_version(install: TritonInstall) -> str:
    """X.Y of the Python the stub will run: the venv's (its lib/pythonX.Y directory)."""
    name = install.site_packages.parent.name  # pythonX.Y
    return name.removeprefix("python") if name.startswith("python3") else f"{sys.version_info.major}.{sys.version_info.minor}"


def setup(venv: Path) -> Path:
    """Copy the python backend stub into backends/python/; return its path."""
    install = find_install(venv)
    version = _python_version(install)
    sources = sorted(install.root.rglob(f"python_backend_stubs/{version}/{STUB}"))
    if not sources:
        raise FileNotFoundError(f"no python_backend_stubs/{version}/{STUB} under {install.root}")
    target_dir = install.backends / "python"
    if not target_dir.is_dir():
        raise FileNotFoundError(f"python backend missing: {target_dir}")
    target = target_dir / STUB
    if not (target.is_file() and filecmp.cmp(sources[0], target, shallow=False)):
        tmp = target.with_suffix(".tmp")
        shutil.copy2(sources[0], tmp)
        os.replace(tmp, target)
    target.chmod(0o755)
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m agent.runtimes.triton_setup VENV", file=sys.stderr)
        return 2
    try:
        stub = setup(Path(args[0]))
    except FileNotFoundError as e:
        print(f"triton_setup: {e}", file=sys.stderr)
        return 1
    print(f"triton_setup: python backend stub ready at {stub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
