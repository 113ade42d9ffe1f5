"""GPU memory on a REAL GPU (marked `gpu`; skipped with the reason where NVML finds no device, as
on this project's CI). The server allocates device memory through the CUDA driver (ctypes on
libcuda, benchmarks/gpu_server.py); NVML per-process figures are the truth checked against."""
from __future__ import annotations

import pytest

from benchmarks.gpu_check import check_agent_budget, check_per_process, check_two_servers, nvml_device

_found = nvml_device(0)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(isinstance(_found, str), reason=f"no GPU: {_found}" if isinstance(_found, str) else ""),
]


@pytest.mark.timeout(120)
def test_nvml_per_process_accounting_measures_each_model(tmp_path):
    nvml, handle = _found
    r = check_per_process(tmp_path, nvml, handle, 0, [64, 128])
    assert r["verdict"] == "met", r


@pytest.mark.timeout(120)
def test_two_servers_sharing_one_gpu_are_told_apart(tmp_path):
    nvml, handle = _found
    r = check_two_servers(tmp_path, nvml, handle, 0, 96, 192)
    assert r["verdict"] == "met", r


@pytest.mark.timeout(300)
def test_agent_measures_each_gpu_model_through_nvml(tmp_path):
    """Each model's GPU cost in /status is its real size (within 10%), whatever it declared.
    Keeping device memory under the budget when a declaration is too low needs the reconciler's
    reality loop (evict on excess): benchmarks/gpu_check.py reports that verdict."""
    nvml, handle = _found
    r = check_agent_budget(tmp_path, nvml, handle, 0, budget_mib=768, model_mib=256, n_models=6, requests=18)
    assert r["verdict_measured"] == "met", r["measured_gpu"]
    assert r["reality"] is not None and r["reality"]["real"] is not None, r["reality"]
