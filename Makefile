# Two commands on a fresh machine:  make run   |   make test
# Each creates the virtual environments it needs on first use.
PYTHON ?= python3
SERVER ?= mlserver
VENV   := .venv
TRITON_VENV := .venv-triton
KSERVE_VENV := .venv-kserve
RAY_VENV := .venv-ray
PIP_QUIET := --quiet --disable-pip-version-check
# pip prints one warning per package for the machine's file:// mirrors; keep the log readable
PIP_FILTER := 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: run test venv triton kserve ray demo bench bench-peers clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) --upgrade pip $(PIP_FILTER)
	$(VENV)/bin/pip install $(PIP_QUIET) -e '.[mlserver,test]' $(PIP_FILTER)
	$(VENV)/bin/python -c "import mlserver, moto, sklearn, fastapi"
	touch $@

venv: $(VENV)/.installed

# Triton needs numpy<2 (nvidia-pytriton bundles a real tritonserver binary): its own venv.
$(TRITON_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install $(PIP_QUIET) 'nvidia-pytriton==0.7.0' $(PIP_FILTER)
	$(VENV)/bin/python -m agent.runtimes.triton_setup $(TRITON_VENV)
	touch $@

triton: $(TRITON_VENV)/.installed

# KServe's own SDK (a client the protocol tests drive unchanged) pins numpy/pandas/fastapi
# versions that clash with MLServer's: its own venv.
$(KSERVE_VENV)/.installed:
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install $(PIP_QUIET) 'kserve==0.21.0' $(PIP_FILTER)
	$(KSERVE_VENV)/bin/python -c "import kserve"
	touch $@

kserve: $(KSERVE_VENV)/.installed

# The agent on its embedded default: a local model store, an embedded MLServer, a config dir to edit.
# `make run SERVER=triton` runs the same with an embedded Triton and Triton model dirs.
run: venv $(if $(filter triton,$(SERVER)),triton)
	$(VENV)/bin/python -m agent.demo run --server $(SERVER)

# nginx (Debian's package) runs the no-gateway fallback's path map for real (tests/deploy,
# bench_cluster). Best effort: where apt is not usable the test says it skipped and why.
nginx:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -q nginx >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nginx >/dev/null 2>&1; }; }; } || \
	  echo "nginx not installed: its test skips (apt-get install -y nginx)"

# Two workers (pytest-xdist), each given whole modules (--dist loadscope: a module's servers start
# once) in collection order (--no-loadscope-reorder: xdist's default order by test count would put slow
# one-test modules such as fleet/test_agent_ready last); each worker starts its own session servers on free ports, in its own temp dirs.
test: venv triton kserve nginx
	$(VENV)/bin/python -m pytest -n 2 --dist loadscope --no-loadscope-reorder

bench: venv triton
	$(VENV)/bin/pip install $(PIP_QUIET) -e '.[mlserver,test,bench]' $(PIP_FILTER)
	@echo "see benchmarks/README.md for each benchmark's command"

# Ray Serve, the peer bench_peers compares with, in its own venv so it never disturbs .venv. It
# loads the very model.joblib files MLServer loads: scikit-learn, joblib and numpy are pinned to
# .venv's versions (a pickle is only safe to load with the version that wrote it). jinja2: ray 2.58's
# serve imports it (serve/_private/haproxy.py) but its `serve` extra does not require it.
$(RAY_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/pip install $(PIP_QUIET) 'ray[serve]==2.58.0' jinja2 \
	  $$($(VENV)/bin/python -c "from importlib.metadata import version as v; print(*(f'{p}=={v(p)}' for p in ('scikit-learn', 'joblib', 'numpy', 'psutil')))") $(PIP_FILTER)
	$(RAY_VENV)/bin/python -c "import ray.serve, sklearn, joblib"
	touch $@

ray: $(RAY_VENV)/.installed

# modelshelf vs Ray Serve multiplexing vs MLServer with everything loaded (benchmarks/bench_peers.py);
# BENCH_ARGS=--quick for a short look. Runs under the shared benchmark lock.
bench-peers: venv ray
	flock /tmp/modelshelf-bench.lock $(VENV)/bin/python benchmarks/bench_peers.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(KSERVE_VENV) $(RAY_VENV) demo
