"""A custom MLServer runtime whose load misbehaves on command, for the fault suite.

`write_fault_model(dir, mode)` writes `fault_model.py` + `fault.json`; served as
`runtime: mlserver`, `implementation: FAULT_IMPLEMENTATION`. Modes:

- "raise": load() raises RuntimeError(message);
- "hang": load() sleeps `hang_s` seconds (a load that never finishes in time);
- "exit": load() ends the server process at once (os._exit), as a native crash in a model's
  load would. Careful: it does so only in a process whose environment carries the token the
  model was written with (FAULT_TOKEN_ENV), i.e. only the server of the agent the test started
  with that token; anywhere else it raises instead.

Each load appends a line to `load_log` when given (to count the attempts inside the server).
"""
from __future__ import annotations

import json
from pathlib import Path

FAULT_IMPLEMENTATION = "fault_model.FaultModel"
FAULT_TOKEN_ENV = "MODELSHELF_FAULT_TEST_TOKEN"

_FAULT_MODEL = '''"""Test runtime: a load that raises, hangs or ends the server process (see fault.json)."""
import asyncio
import json
import os
import time

from mlserver import MLModel


class FaultModel(MLModel):
    async def load(self) -> bool:
        uri = self.settings.parameters.uri
        with open(os.path.join(uri if os.path.isdir(uri) else os.path.dirname(uri), "fault.json")) as f:
            conf = json.load(f)
        if conf.get("load_log"):
            with open(conf["load_log"], "a") as f:
                f.write(f"{self.name} {os.getpid()} {time.time()}\\n")
        mode = conf["mode"]
        if mode == "raise":
            raise RuntimeError(conf["message"])
        if mode == "hang":
            await asyncio.sleep(float(conf["hang_s"]))
            return True
        if mode == "exit":
            if os.environ.get("%(env)s") != conf["token"]:
                raise RuntimeError("fault_model: exit refused outside the test's own server")
            os._exit(17)
        raise RuntimeError(f"unknown mode {mode!r}")
''' % {"env": FAULT_TOKEN_ENV}


def write_fault_model(directory: Path, mode: str, *, message: str = "", hang_s: float = 600.0,
                      token: str = "", load_log: Path | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fault_model.py").write_text(_FAULT_MODEL)
    conf = {"mode": mode, "message": message, "hang_s": hang_s, "token": token,
            "load_log": str(load_log) if load_log else None}
    (directory / "fault.json").write_text(json.dumps(conf))
    return directory


def fault_entry(name: str, directory: Path, **extra: object) -> dict:
    """A models.yaml entry serving `directory` with the fault runtime."""
    return {"name": name, "uri": str(directory), "runtime": "mlserver", "implementation": FAULT_IMPLEMENTATION, **extra}
