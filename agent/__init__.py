"""modelshelf agent: keeps a co-located model server stocked with the configured models."""
import sys as _sys

# httpx imports its command-line client (click, rich, pygments: ~3 MiB of the agent's RSS)
# whenever those happen to be installed (MLServer brings them); the agent never runs it. A None
# entry makes that one import fail, which httpx handles: its `main` then only says how to
# install the CLI. Every agent module (and puller, imported through agent.app) sees it first.
_sys.modules.setdefault("httpx._main", None)
