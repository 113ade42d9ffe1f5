"""modelshelf puller: storage URI -> files on local disk, through a shared, crash-safe cache.

Public API (the agent uses only this):

    from puller import Cache, PullOptions, Entry
    cache = Cache("/var/cache/modelshelf", max_bytes=50 * 2**30, holder="pod-a")
    entry = cache.ensure("s3://bucket/models/iris", PullOptions(storage_key="minio"))
    entry.path      # directory holding the model's files (read-only by convention)
    cache.lease(entry.key); ...; cache.release(entry.key)

`puller` never imports `agent`.
"""
from puller.errors import PullError

__all__ = ["Cache", "Entry", "PullOptions", "PullError", "model_holder"]


def __getattr__(name: str):
    """Cache, Entry, model_holder and PullOptions on first use: `modelshelf pull` imports this
    package first and puller.cache only once its listing's requests are on the wire (puller.cli)."""
    if name in ("Cache", "Entry", "model_holder"):
        from puller import cache

        return getattr(cache, name)
    if name == "PullOptions":
        from puller.sources.base import PullOptions

        return PullOptions
    raise AttributeError(f"module 'puller' has no attribute {name!r}")
