"""`modelshelf prefetch`: pull every model of the model config into the cache, then exit.

For a Kubernetes Job/CronJob that fills a shared PVC (or a node-local cache) before serving
pods start. Exit status: 0 when every model is cached, 1 when any failed (each failure is
named on stderr) or the models do not fit in --max-cache-bytes, 2 when the config file itself
does not parse.

Every entry the run pulls (or finds) is leased for the run (holder `<holder>-prefetch@<model>`),
so a GC the run itself triggers (--max-cache-bytes) never removes what it reported cached; the
leases are released when it exits. When the models do not fit the budget together, the run says
so (and by how much) instead of reporting a cache that the next GC will shrink.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from agent.config import ConfigParseError, ModelSpec, load_config_dir
from agent.logging import get_logger, kv, setup_logging
from agent.settings import Settings
from puller import Cache, PullError
from puller.cache import model_holder
from puller.progress import make_progress

log = get_logger("modelshelf.prefetch")


def prefetch(settings: Settings) -> int:
    setup_logging(settings.log_format, settings.log_level)
    try:
        config = load_config_dir(settings.config_dir, settings.config_limits())
    except ConfigParseError as e:
        print(f"modelshelf prefetch: {e}", file=sys.stderr)
        return 2
    for err in config.errors:
        print(f"modelshelf prefetch: skipped {err}", file=sys.stderr)
    cache = Cache(settings.cache_dir, max_bytes=settings.max_cache_bytes, holder=settings.holder)
    progress = make_progress(enabled=True)
    started = time.monotonic()
    failed: dict[str, str] = {}
    hits = downloaded = 0
    holder = f"{settings.holder}-prefetch"
    leased: list[tuple[str, str]] = []
    cached_bytes = 0

    def one(spec: ModelSpec):
        return cache.ensure(spec.uri, settings.pull_options(spec), progress, lease=True,
                            holder=model_holder(holder, spec.name))

    try:
        with ThreadPoolExecutor(max_workers=max(1, settings.pull_concurrency)) as pool:
            futures = {pool.submit(one, spec): spec.name for spec in config.models.values()}
            for future in as_completed(futures):
                name = futures[future]
                try:
                    entry = future.result()
                except PullError as e:
                    failed[name] = str(e)
                    log.error("prefetch failed", extra=kv(model=name, reason=str(e)))
                    continue
                if not entry.in_place and all(k != entry.key for k, _ in leased):
                    cached_bytes += entry.size  # bytes the cache holds for these models (once per entry)
                leased.append((entry.key, model_holder(holder, name)))
                hits += entry.hit
                downloaded += not entry.hit
                log.info("prefetched", extra=kv(model=name, key=entry.key, hit=entry.hit, bytes=entry.size))
        seconds = round(time.monotonic() - started, 2)
        print(f"modelshelf prefetch: {len(config.models) - len(failed)}/{len(config.models)} models cached "
              f"({downloaded} downloaded, {hits} already there) in {seconds}s", file=sys.stderr)
        for name, reason in sorted(failed.items()):
            print(f"modelshelf prefetch: FAILED {name}: {reason}", file=sys.stderr)
        budget = settings.max_cache_bytes
        over = budget is not None and cached_bytes > budget
        if over:
            print(f"modelshelf prefetch: the models need {cached_bytes} bytes of cache, more than "
                  f"--max-cache-bytes {budget}: they do not all fit; the next GC removes the least recently "
                  f"used", file=sys.stderr)
    finally:
        for key, h in leased:
            cache.release(key, h)
    return 1 if failed or config.errors or over else 0
