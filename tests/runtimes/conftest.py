"""Runtime adapter tests: a real embedded MLServer and Triton on loopback (one per session)."""
from tests.support.servers import mlserver, mlserver_session, triton, triton_session  # noqa: F401  (fixtures)
