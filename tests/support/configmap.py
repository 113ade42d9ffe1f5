"""A Kubernetes ConfigMap volume, built by hand the way kubelet's AtomicWriter builds it.

    cm = ConfigMapDir(tmp_path / "config")       # cm.root: the directory to watch
    cm.write({"models.yaml": "- name: iris\\n  uri: /models/iris\\n"})   # first write or update

Layout after a write:
    ..2026_11_22_02_00_05.123456789/models.yaml   the payload, in a fresh timestamped dir
    ..data -> ..2026_11_22_02_00_05.123456789      swapped atomically on every update
    models.yaml -> ..data/models.yaml              user-visible names, created once

An update: new timestamped dir with the payload, `..data_tmp` symlink to it, rename(2) over
`..data`, user-visible links for new keys, links of removed keys deleted, old dir removed.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

DATA = "..data"
DATA_TMP = "..data_tmp"


class ConfigMapDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.root = self.path  # the directory to mount / watch
        self.path.mkdir(parents=True, exist_ok=True)
        self._seq = 0

    def _new_ts_dir(self) -> Path:
        self._seq += 1
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S", time.gmtime())
        ts = self.path / f"{stamp}.{time.time_ns() % 10**9:09d}{self._seq:04d}"
        ts.mkdir()
        return ts

    def current(self) -> Path | None:
        link = self.path / DATA
        return self.path / os.readlink(link) if link.is_symlink() else None

    def write(self, payload: dict[str, str | bytes]) -> float:
        """Publish `payload` (file name -> content) as the new version. Returns time.monotonic()
        right after the atomic swap (the moment the new content becomes visible)."""
        old = self.current()
        old_names = set(os.listdir(old)) if old else set()
        ts = self._new_ts_dir()
        for name, content in payload.items():
            (ts / name).write_bytes(content.encode() if isinstance(content, str) else content)
        tmp = self.path / DATA_TMP
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(ts.name, tmp)
        os.rename(tmp, self.path / DATA)
        swapped = time.monotonic()
        for name in payload:
            link = self.path / name
            if not link.is_symlink():
                os.symlink(f"{DATA}/{name}", link)
        for name in old_names - set(payload):
            (self.path / name).unlink(missing_ok=True)
        if old is not None:
            shutil.rmtree(old)
        return swapped
