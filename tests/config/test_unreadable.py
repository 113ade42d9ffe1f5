"""A config file that cannot be read changes nothing (issue 8 item 10), through the real watcher
on real directories (ConfigMap `..data` swaps built like kubelet's) with real inotify.

The rule: once a config file was applied, an absent or unreadable file is NOT "zero models".
The watcher re-reads after a short grace (1 s by default): a file back by then is absorbed
silently; one still gone is reported ("config file unreadable: ...", the caller's parse_error)
and the last good config stays. An explicit empty list is how to serve no models."""
from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from agent.watcher import ConfigWatcher
from tests.config.conftest import Recorder, arun
from tests.support.configmap import DATA, ConfigMapDir

GOOD = "- {name: a, uri: /models/a}\n- {name: b, uri: /models/b}\n"
GRACE = 1.0  # the watcher's default: these tests use it, so they say what a user gets


def watcher(path, rec: Recorder) -> ConfigWatcher:
    return ConfigWatcher(path, rec.on_change, rec.on_error, debounce_s=0.05, retry_interval_s=0.05)


def assert_kept(rec: Recorder) -> None:
    """Nothing but the first, good config was ever delivered."""
    assert [sorted(r.models) for _, r in rec.changes] == [["a", "b"]], "a config was applied from an unreadable file"


async def reported(rec: Recorder, *words: str) -> str:
    await rec.wait_for(lambda r: r.errors, timeout=GRACE + 3.0, what="the unreadable file reported")
    reason = rec.errors[-1][1].reason
    for word in words:
        assert word in reason, reason
    return reason


def run_case(root, rec: Recorder, fault, *words: str, repair=None) -> None:
    """Start on GOOD, apply `fault`, expect it reported with `words` and nothing applied; then
    `repair` (default: write GOOD plus a third model) is delivered."""

    async def go():
        w = watcher(root, rec)
        await w.start()
        try:
            assert rec.names() == ["a", "b"]
            await asyncio.to_thread(fault)
            await reported(rec, "config file unreadable", *words)
            assert_kept(rec)
            if repair is not None:
                await asyncio.to_thread(repair)
                await rec.wait_for(lambda r: len(r.changes) == 2, timeout=3.0, what="the repaired file")
                assert rec.names() == ["a", "b", "c"]
        finally:
            await w.stop()

    arun(go())


def test_a_dangling_symlink_keeps_the_last_good_config(tmp_path, recorder):
    cm = ConfigMapDir(tmp_path / "cm")
    cm.write({"models.yaml": GOOD})

    def fault():
        link = cm.root / "models.yaml"
        link.unlink()
        link.symlink_to(f"{DATA}/no-such-file.yaml")

    def repair():
        (cm.root / "models.yaml").unlink()
        (cm.root / "models.yaml").symlink_to(f"{DATA}/models.yaml")
        cm.write({"models.yaml": GOOD + "- {name: c, uri: /models/c}\n"})

    run_case(cm.root, recorder, fault, "dangling symlink", "no-such-file.yaml", repair=repair)


def test_a_looping_symlink_keeps_the_last_good_config(tmp_path, recorder):
    (tmp_path / "models.yaml").write_text(GOOD)

    def fault():
        os.unlink(tmp_path / "models.yaml")
        os.symlink("loop-b", tmp_path / "loop-a")
        os.symlink("loop-a", tmp_path / "loop-b")
        os.symlink("loop-a", tmp_path / "models.yaml")

    def repair():
        os.unlink(tmp_path / "models.yaml")
        (tmp_path / "models.yaml").write_text(GOOD + "- {name: c, uri: /models/c}\n")

    run_case(tmp_path, recorder, fault, "symlink loop", repair=repair)


@pytest.mark.parametrize("make, words", [(os.mkdir, "a directory"), (os.mkfifo, "not a regular file")],
                         ids=["directory", "fifo"])
def test_something_else_under_the_name_keeps_the_last_good_config(tmp_path, recorder, make, words):
    """A FIFO is never opened for a read (it would block the reading thread until a writer came)."""
    (tmp_path / "models.yaml").write_text(GOOD)

    def fault():
        os.unlink(tmp_path / "models.yaml")
        make(tmp_path / "models.yaml")

    run_case(tmp_path, recorder, fault, words)


def test_a_delete_then_rewrite_0_3_s_later_is_absorbed(tmp_path, recorder):
    path = tmp_path / "models.yaml"
    path.write_text(GOOD)

    async def go():
        w = watcher(tmp_path, recorder)
        await w.start()
        try:
            path.unlink()
            await asyncio.sleep(0.3)
            path.write_text(GOOD)  # the same content, as a tool that deletes then writes does
            await asyncio.sleep(GRACE + 0.5)  # past the grace: any report would have come
            assert_kept(recorder)
            assert recorder.errors == [], "a transient delete was reported"
            path.unlink()
            await asyncio.sleep(0.3)
            path.write_text(GOOD + "- {name: c, uri: /models/c}\n")  # a rewrite with new content
            await recorder.wait_for(lambda r: len(r.changes) == 2, timeout=3.0, what="the rewritten file")
            assert recorder.names() == ["a", "b", "c"] and recorder.errors == []
        finally:
            await w.stop()

    arun(go())


def test_a_file_deleted_for_good_is_reported_and_the_config_kept(tmp_path, recorder):
    path = tmp_path / "models.yaml"
    path.write_text(GOOD)
    run_case(tmp_path, recorder, path.unlink, "gone", "empty list",
             repair=lambda: path.write_text(GOOD + "- {name: c, uri: /models/c}\n"))


def test_a_configmap_swapped_to_an_empty_payload_keeps_the_last_good_config(tmp_path, recorder):
    cm = ConfigMapDir(tmp_path / "cm")
    cm.write({"models.yaml": GOOD})
    run_case(cm.root, recorder, lambda: cm.write({}), "gone",
             repair=lambda: cm.write({"models.yaml": GOOD + "- {name: c, uri: /models/c}\n"}))


def test_a_config_dir_removed_and_recreated_empty_keeps_the_last_good_config(tmp_path, recorder):
    root = tmp_path / "cm"
    ConfigMapDir(root).write({"models.yaml": GOOD})

    async def go():
        w = watcher(root, recorder)
        await w.start()
        try:
            shutil.rmtree(root)
            root.mkdir()
            await asyncio.sleep(GRACE + 0.5)
            assert_kept(recorder)
            await recorder.wait_for(lambda r: any("gone" in e.reason for _, e in r.errors), timeout=3.0,
                                    what="the empty directory reported")
            ConfigMapDir(root).write({"models.yaml": GOOD + "- {name: c, uri: /models/c}\n"})
            await recorder.wait_for(lambda r: len(r.changes) == 2, timeout=3.0, what="the new ConfigMap")
            assert recorder.names() == ["a", "b", "c"]
        finally:
            await w.stop()

    arun(go())


def test_an_explicit_empty_list_still_removes_every_model(tmp_path, recorder):
    cm = ConfigMapDir(tmp_path / "cm")
    cm.write({"models.yaml": GOOD})

    async def go():
        w = watcher(cm.root, recorder)
        await w.start()
        try:
            cm.write({"models.yaml": "models: []\n"})
            await recorder.wait_for(lambda r: len(r.changes) == 2, timeout=3.0, what="the empty list")
            assert recorder.names() == [] and recorder.errors == []
        finally:
            await w.stop()

    arun(go())


def test_at_start_up_a_directory_without_a_config_file_is_the_empty_set(tmp_path, recorder):
    async def go():
        w = watcher(tmp_path, recorder)
        await w.start()
        try:
            assert recorder.names() == [] and recorder.changes[0][1].file is None and recorder.errors == []
            (tmp_path / "models.yaml").write_text(GOOD)
            await recorder.wait_for(lambda r: len(r.changes) == 2, timeout=3.0, what="the first file")
            assert recorder.names() == ["a", "b"]
        finally:
            await w.stop()

    arun(go())
