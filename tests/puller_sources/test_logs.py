"""puller.logs: loggers made on first use, after the program's logging setup (a fresh
interpreter: in pytest's, logging is imported already and setups run at once)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import sys, threading
from puller import logs
assert "logging" not in sys.modules
started, release, order = threading.Event(), threading.Event(), []

def setup():  # the program's handler, held half-done until the second thread is seen to wait
    started.set()
    release.wait(10)
    import logging
    logging.basicConfig(level=logging.INFO, format="configured %(name)s %(message)s", stream=sys.stdout)
    order.append("configured")

logs.configure_first(setup)
a = threading.Thread(target=lambda: logs.get_logger("modelshelf.a").info("from a"))
b = threading.Thread(target=lambda: (logs.get_logger("modelshelf.b").info("from b"), order.append("b logged")))
a.start()
assert started.wait(10)
b.start()
b.join(0.5)
waited = b.is_alive()  # b's first use waits for the setup a is running
release.set()
a.join(10)
b.join(10)
print("waited" if waited else "did not wait", order)
"""


def test_a_thread_that_first_logs_while_another_configures_logging_waits_for_the_setup() -> None:
    """No record is made before the program's handler is in place, whichever thread logs first."""
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "waited ['configured', 'b logged']", r.stdout
    assert sorted(lines[:-1]) == ["configured modelshelf.a from a", "configured modelshelf.b from b"]
