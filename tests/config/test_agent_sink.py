"""A rejected or unreadable config as the agent shows it: the real ConfigWatcher feeding the
real Reconciler (its cache and memory ledger; models `preload: false`, so no server is needed and
the adapter is never started). /status's parse_error, the config-error metric and the models in
force are what a user sees."""
from __future__ import annotations

import asyncio

from agent.memory import MemoryManager
from agent.metrics import Metrics
from agent.reconciler import Reconciler
from agent.runtimes import make_adapter
from agent.settings import Settings
from agent.watcher import ConfigWatcher
from puller import Cache
from tests.config.conftest import arun
from tests.config.test_limits import alias_bomb
from tests.support.configmap import ConfigMapDir

GOOD = "- {name: a, uri: /models/a, preload: false}\n- {name: b, uri: /models/b, preload: false}\n"


def test_a_bomb_then_a_vanished_file_keep_the_models_and_show_why(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "models" / name).mkdir(parents=True)
    cm = ConfigMapDir(tmp_path / "config")
    cm.write({"models.yaml": GOOD.replace("/models/", f"{tmp_path}/models/")})
    settings = Settings(config_dir=cm.root, cache_dir=tmp_path / "cache", holder="test")

    async def go():
        metrics = Metrics()
        cache = Cache(settings.cache_dir, holder="test")
        memory = MemoryManager.from_settings(settings, store=cache, server_pid=None, gpu_probe=None)
        rec = Reconciler(settings, cache, make_adapter("mlserver", repository=tmp_path / "repo"), memory, metrics)
        w = ConfigWatcher(cm.root, rec.apply, rec.config_failed, debounce_s=0.05)
        await w.start()

        async def until(predicate, what):
            for _ in range(400):
                if predicate(rec.status()):
                    return rec.status()
                await asyncio.sleep(0.01)
            raise AssertionError(f"timed out waiting for {what}: {rec.status()['config']}")

        def serving(status):
            return sorted(n for n, m in status["models"].items() if not rec.models[n].removed)

        try:
            await rec.wait_idle(30)
            assert serving(rec.status()) == ["a", "b"]
            cm.write({"models.yaml": alias_bomb(7)})  # 4.8 million strings; 9 levels on main would exhaust memory
            status = await until(lambda s: s["config"]["parse_error"], "the bomb shown")
            assert "--max-config-nodes" in status["config"]["parse_error"]
            assert serving(status) == ["a", "b"]
            assert metrics.config_errors.labels(kind="file")._value.get() == 1

            cm.write({})  # the ConfigMap loses its key: models.yaml is gone
            status = await until(lambda s: "unreadable" in (s["config"]["parse_error"] or ""), "the vanished file shown")
            assert "gone" in status["config"]["parse_error"] and serving(status) == ["a", "b"]
            assert metrics.config_errors.labels(kind="file")._value.get() == 2
        finally:
            await w.stop()
            await rec.close()

    arun(go())
