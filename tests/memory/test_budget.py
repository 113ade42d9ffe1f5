"""Budget discovery: --host-memory / --gpu-memory specs, cgroup limits (files in a temp dir
stand in for /sys/fs/cgroup and /proc/self/cgroup), and the NVML-absent path (real pynvml)."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import memory
from agent.memory import HOST, MemoryManager, cgroup_memory_limit, discover_budget, host_memory_total, parse_budget

from .conftest import GiB, MiB


def _nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.parametrize("spec,whole,expected", [
    ("8Gi", None, (8 * GiB, False)),
    ("1.5G", None, (1_500_000_000, False)),
    (1048576, None, (1048576, False)),
    ("123456", 10, (123456, False)),
    ("50%", 10 * GiB, (5 * GiB, True)),
    (" 12.5 % ", 8 * GiB, (1 * GiB, True)),
    ("100%", 4096, (4096, True)),
    (None, 10 * GiB, (8 * GiB, True)),  # default 80%
    ("", 10 * GiB, (8 * GiB, True)),
])
def test_parse_budget(spec, whole, expected):
    assert parse_budget(spec, whole, default_percent=80, what="--host-memory") == expected


@pytest.mark.parametrize("spec,whole", [("abc%", 100), ("0%", 100), ("150%", 100), ("-5%", 100), ("50%", None),
                                        ("12 parsecs", 100), ("500m", 100)])
def test_parse_budget_rejects_with_the_flag_named(spec, whole):
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_budget(spec, whole, default_percent=90, what="--gpu-memory")


def _cg(tmp_path: Path, files: dict[str, str], self_cgroup: str = "0::/\n") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    root.mkdir(exist_ok=True)
    sc = tmp_path / "self_cgroup"
    sc.write_text(self_cgroup)
    return root, sc


def test_cgroup_v2_limit_and_max(tmp_path):
    root, sc = _cg(tmp_path / "a", {"memory.max": "2147483648\n"})
    assert cgroup_memory_limit(root, sc) == 2 * GiB
    root, sc = _cg(tmp_path / "b", {"memory.max": "max\n"})
    assert cgroup_memory_limit(root, sc) is None


def test_cgroup_v1_unlimited_is_no_limit(tmp_path):
    root, sc = _cg(tmp_path, {"memory/memory.limit_in_bytes": "9223372036854771712\n"}, "4:memory:/\n")
    assert cgroup_memory_limit(root, sc) is None


def test_cgroup_v1_own_path_without_namespace(tmp_path):
    # the mount shows the host's root (unlimited) and our own cgroup further down, as on this machine
    root, sc = _cg(tmp_path, {
        "memory/memory.limit_in_bytes": "9223372036854771712\n",
        "memory/kubepods/pod1/ctr/memory.limit_in_bytes": str(3 * GiB),
    }, "9:name=systemd:/\n4:memory:/kubepods/pod1/ctr\n1:cpu:/\n0::/\n")
    assert cgroup_memory_limit(root, sc) == 3 * GiB


def test_cgroup_v2_own_path_smallest_wins(tmp_path):
    root, sc = _cg(tmp_path, {"memory.max": str(8 * GiB), "kubepods/x/memory.max": str(1 * GiB)}, "0::/kubepods/x\n")
    assert cgroup_memory_limit(root, sc) == 1 * GiB


def test_no_cgroup_files_at_all(tmp_path):
    assert cgroup_memory_limit(tmp_path / "nothing", tmp_path / "nope") is None


def test_host_total_prefers_cgroup_below_ram(tmp_path):
    root, sc = _cg(tmp_path, {"memory.max": str(2 * GiB)})
    assert host_memory_total(root, sc, ram_total=16 * GiB) == (2 * GiB, "cgroup")
    assert host_memory_total(root, sc, ram_total=1 * GiB) == (1 * GiB, "ram")
    assert host_memory_total(tmp_path / "none", sc, ram_total=16 * GiB) == (16 * GiB, "ram")


def test_host_total_real_machine_is_positive():
    total, source = host_memory_total()
    assert total > 256 * MiB and source in ("cgroup", "ram")


def test_discover_host_percent_of_cgroup_minus_overhead(tmp_path):
    root, sc = _cg(tmp_path, {"memory.max": str(2 * GiB)})
    kw = dict(cgroup_root=root, self_cgroup=sc, ram_total=64 * GiB)
    assert discover_budget("50%", **kw) == {HOST: 1 * GiB}
    # the server's baseline is overhead: subtracted from a percentage budget...
    assert discover_budget(None, host_overhead=230 * MiB, **kw) == {HOST: int(2 * GiB * 0.8) - 230 * MiB}
    # ...but an absolute budget is the models' budget as written
    assert discover_budget("512Mi", host_overhead=230 * MiB, **kw) == {HOST: 512 * MiB}
    # and never more than the container has
    assert discover_budget("10Gi", **kw) == {HOST: 2 * GiB}


def test_discover_gpu_per_device(tmp_path, fake_gpu):
    root, sc = _cg(tmp_path, {})
    kw = dict(cgroup_root=root, self_cgroup=sc, ram_total=64 * GiB, gpu_probe=fake_gpu)
    b = discover_budget("8Gi", None, **kw)
    assert b == {HOST: 8 * GiB, "gpu:0": int(16 * GiB * 0.9), "gpu:1": int(24 * GiB * 0.9)}
    assert discover_budget("8Gi", "50%", **kw) == {HOST: 8 * GiB, "gpu:0": 8 * GiB, "gpu:1": 12 * GiB}
    # bytes are per device, clamped to each device's total
    assert discover_budget("8Gi", "20Gi", **kw) == {HOST: 8 * GiB, "gpu:0": 16 * GiB, "gpu:1": 20 * GiB}


@pytest.mark.skipif(_nvml_works(), reason="a GPU with a driver is present: the no-NVML path cannot be exercised")
def test_nvml_absent_gpu_budgeting_off_said_once(caplog):
    """Real nvidia-ml-py on a machine without the NVML library: off, one info line, no error."""
    caplog.set_level(logging.DEBUG, logger="modelshelf.memory")
    settings = SimpleNamespace(host_memory="1Gi", gpu_memory="90%", memory_multipliers={}, min_residency_s=5.0,
                               server="mlserver")
    mm = MemoryManager.from_settings(settings)
    assert not mm.gpu_enabled
    assert mm.budget() == {HOST: 1 * GiB}
    gpu_lines = [r for r in caplog.records if "gpu" in r.getMessage().lower() and r.name == "modelshelf.memory"]
    assert len(gpu_lines) == 1, [r.getMessage() for r in gpu_lines]
    assert gpu_lines[0].levelno == logging.INFO and "gpu_budgeting=off" in gpu_lines[0].getMessage()
    assert "NVMLError" in gpu_lines[0].getMessage()
    # a declared GPU amount does not make anything fail: nothing to place it on, not budgeted
    cost = mm.cost_for(key=None, runtime="pytorch", entry_bytes=10 * MiB, declared_gpu=4 * GiB)
    assert cost.gpu == {} and mm.fits(cost)
    assert memory.open_gpu_probe() is None


def test_the_default_allocator_keep_is_bounded_by_the_budget():
    """--server-malloc-keep not given: its default, but never more than 1/8 of the host budget
    (a small budget keeps its room for models); a budget that does not parse keeps nothing
    (the agent refuses it at start, naming --host-memory)."""
    from agent.memory.budget import default_malloc_keep

    assert default_malloc_keep("400Mi", 128 * MiB) == 50 * MiB
    assert default_malloc_keep("2Gi", 128 * MiB) == 128 * MiB
    assert default_malloc_keep("lots", 128 * MiB) == 0
