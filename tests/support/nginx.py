"""A real nginx (Debian's `nginx` package) as the no-gateway fallback: a consistent hash of the
model name that deploy/k8s/07-scale-out's `map` takes from the path.

The `map` is read from the manifest (the ingress-nginx controller ConfigMap's `http-snippet`), so
tests and benchmarks run exactly what is deployed; only the upstream list and ports are ours.
`Nginx(upstreams).start()`; `url`; `stop()`. Without the binary, `nginx_binary()` raises with the
install command (`apt-get install -y nginx`).
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

from tests.support.net import free_port, stop_group

REPO = Path(__file__).resolve().parents[2]
CONTROLLER_CONFIGMAP = REPO / "deploy/k8s/07-scale-out/mesh-affinity/ingress-nginx-controller-configmap.yaml"
HASH_VARIABLE = "$modelshelf_model"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise FileNotFoundError("no nginx binary: apt-get install -y nginx")
    return found


def deployed_map() -> str:
    """The `map` block of the ingress-nginx controller ConfigMap in deploy/k8s/07-scale-out."""
    return yaml.safe_load(CONTROLLER_CONFIGMAP.read_text())["data"]["http-snippet"]


def nginx_conf(port: int, upstreams: list[str], workdir: Path, workers: int = 1) -> str:
    servers = "\n".join(f"    server {u} max_fails=1 fail_timeout=5s;" for u in upstreams)
    return textwrap.dedent("""\
        worker_processes {workers};
        pid {dir}/nginx.pid;
        error_log {dir}/error.log warn;
        events {{ worker_connections 1024; }}
        http {{
          access_log off;
          client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
          fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
          client_max_body_size 64m;
        {map}
          upstream agents {{
            hash {var} consistent;
        {servers}
            keepalive 64;
          }}
          server {{
            listen 127.0.0.1:{port};
            location / {{
              proxy_pass http://agents;
              proxy_http_version 1.1;
              proxy_set_header Connection "";
              proxy_read_timeout 180s;
              proxy_next_upstream error timeout;
            }}
          }}
        }}
        """).format(workers=workers, dir=workdir, map=textwrap.indent(deployed_map(), "  "), var=HASH_VARIABLE,
                    servers=servers, port=port)


class Nginx:
    """One nginx master (+ `workers`) on a free port, hashing on the deployed map's model name."""

    def __init__(self, upstreams: list[str], workdir: Path | None = None, workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="modelshelf-nginx-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(nginx_conf(self.port, upstreams, self.dir, workers))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15) -> "Nginx":
        binary = nginx_binary()
        check = subprocess.run([binary, "-t", "-c", str(self.conf), "-e", str(self.dir / "error.log")],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejects its config: {check.stderr}")
        self.proc = subprocess.Popen([binary, "-c", str(self.conf), "-e", str(self.dir / "error.log"), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_port(timeout)
        return self

    def _wait_port(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"nginx did not listen on {self.port}: {(self.dir / 'error.log').read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGQUIT)  # graceful: workers finish their requests
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
