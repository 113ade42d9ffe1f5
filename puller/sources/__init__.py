"""Storage sources. `open_source(uri, options)` picks one by scheme; see base.Source."""
from puller.sources.base import Listing, PullOptions, RemoteObject, Source, open_source

__all__ = ["Listing", "PullOptions", "RemoteObject", "Source", "open_source"]
