"""Config parsing with limits (issue 9 item 3): an alias bomb, deep nesting (JSON and YAML), an
oversize file and too many values are each rejected like a file that does not parse: a message
naming the limit and its flag, and the last good config kept, also at start-up."""
from __future__ import annotations

import tracemalloc

import pytest

from agent.config import ConfigParseError, load_config_dir, parse_config
from agent.watcher import ConfigWatcher
from tests.config.conftest import Recorder, arun


def alias_bomb(levels: int = 9) -> str:
    """A "billion laughs" models.yaml: each level is a list of 9 aliases of the level below, so
    the last level stands for 9**levels strings. levels=9: 496 bytes, 387 million strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"models: [{{name: bomb, uri: /models/bomb, parameters: {{p: *a{levels - 1}}}}}]")
    return "\n".join(lines) + "\n"


def deep_json(depth: int) -> str:
    return '[{"name": "deep", "uri": "/models/deep", "parameters": {"p": ' + "[" * depth + "]" * depth + "}}]"


def rejected(text: str, filename: str) -> ConfigParseError:
    with pytest.raises(ConfigParseError) as info:
        parse_config(text, filename)
    return info.value


def test_the_alias_bomb_is_rejected_naming_the_limit_with_bounded_memory():
    text = alias_bomb(9)
    assert len(text.encode()) < 512
    tracemalloc.start()
    try:
        err = rejected(text, "models.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "--max-config-nodes" in err.reason and "alias" in err.reason, err.reason
    assert err.file == "models.yaml"
    assert peak < 4 * 2**20, f"parsing a 496-byte file peaked at {peak / 2**20:.1f} MiB"


def test_a_smaller_bomb_that_main_expands_is_rejected_too():
    """Eight levels (43 million strings): today's parser accepts it after seconds and ~600 MiB."""
    tracemalloc.start()
    try:
        err = rejected(alias_bomb(8), "models.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "--max-config-nodes" in err.reason
    assert peak < 4 * 2**20


def test_aliases_within_the_limit_still_work():
    text = (
        "defaults: &defaults {threads: 2, labels: [a, b]}\n"
        "models:\n"
        "  - {name: a, uri: /models/a, parameters: *defaults}\n"
        "  - {name: b, uri: /models/b, parameters: *defaults}\n"
    )
    result = parse_config(text, "models.yaml")
    assert sorted(result.models) == ["a", "b"]
    assert result.models["b"].parameters == {"threads": 2, "labels": ["a", "b"]}


def test_json_nested_100000_deep_is_a_parse_error_naming_the_depth_limit(tmp_path):
    (tmp_path / "models.json").write_text(deep_json(100_000))
    with pytest.raises(ConfigParseError) as info:
        load_config_dir(tmp_path)  # today: RecursionError
    assert info.value.file == "models.json"
    assert "--max-config-depth" in info.value.reason and "64 levels" in info.value.reason


@pytest.mark.parametrize("depth", [100, 100_000])
def test_yaml_nested_too_deep_is_a_parse_error_naming_the_depth_limit(depth):
    """100 levels parse today (libyaml allows 1,000; the result is validated, hashed and
    written to the server recursively); 100,000 stop in libyaml with a message naming no limit."""
    text = "- {name: deep, uri: /models/deep, parameters: {p: " + "[" * depth + "]" * depth + "}}\n"
    err = rejected(text, "models.yaml")
    assert "--max-config-depth" in err.reason and "64 levels" in err.reason, err.reason


def test_block_style_yaml_nesting_is_bounded_too():
    lines = ["- name: deep", "  uri: /models/deep", "  parameters:"]
    lines += ["    " + "  " * i + f"k{i}:" for i in range(80)] + ["    " + "  " * 80 + "leaf"]
    err = rejected("\n".join(lines) + "\n", "models.yaml")
    assert "--max-config-depth" in err.reason


def test_nesting_at_the_limit_is_accepted():
    """Depth counts the top-level list as 1, the entry as 2, parameters as 3: 61 more fit."""
    inner = "[" * 61 + "]" * 61
    result = parse_config(f"- {{name: ok, uri: /models/ok, parameters: {{p: {inner}}}}}\n", "models.yaml")
    assert list(result.models) == ["ok"]
    with pytest.raises(ConfigParseError):
        parse_config(f"- {{name: ok, uri: /models/ok, parameters: {{p: [{inner}]}}}}\n", "models.yaml")


def test_an_oversize_file_is_rejected_by_its_size_without_being_parsed(tmp_path):
    """16 MiB + 1 byte (a sparse file: costs no disk): the default --max-config-bytes."""
    with open(tmp_path / "models.yaml", "wb") as f:
        f.truncate(16 * 2**20 + 1)
    with pytest.raises(ConfigParseError) as info:
        load_config_dir(tmp_path)
    assert info.value.file == "models.yaml"
    assert "--max-config-bytes" in info.value.reason and str(16 * 2**20) in info.value.reason


def test_each_limit_is_configurable(tmp_path):
    from agent.config import ConfigLimits

    text = "".join(f"- {{name: m{i}, uri: /models/m{i}}}\n" for i in range(10))
    (tmp_path / "models.yaml").write_text(text)
    assert len(load_config_dir(tmp_path, ConfigLimits()).models) == 10
    for limits, flag in ((ConfigLimits(max_bytes=100), "--max-config-bytes"),
                         (ConfigLimits(max_nodes=25), "--max-config-nodes"),
                         (ConfigLimits(max_depth=1), "--max-config-depth")):
        with pytest.raises(ConfigParseError) as info:
            load_config_dir(tmp_path, limits)
        assert flag in info.value.reason, (limits, info.value.reason)


def test_the_flags_reach_the_settings():
    from agent.cli import build_parser, settings_from_args

    args = build_parser().parse_args([
        "run", "--config-dir", "/c", "--cache-dir", "/d",
        "--max-config-bytes", "1Mi", "--max-config-depth", "16", "--max-config-nodes", "5000"])
    limits = settings_from_args(args).config_limits()
    assert (limits.max_bytes, limits.max_depth, limits.max_nodes) == (2**20, 16, 5000)
    defaults = settings_from_args(build_parser().parse_args(["run", "--config-dir", "/c", "--cache-dir", "/d"]))
    assert defaults.config_limits().max_bytes == 16 * 2**20


# --------------------------------------------------------------------------- through the watcher


def test_a_bomb_keeps_the_last_good_config_and_the_fix_is_delivered(tmp_path, recorder: Recorder):
    path = tmp_path / "models.yaml"
    path.write_text("- {name: a, uri: /models/a}\n")

    async def go():
        w = ConfigWatcher(tmp_path, recorder.on_change, recorder.on_error, debounce_s=0.05)
        await w.start()
        try:
            path.write_text(alias_bomb(9))
            await recorder.wait_for(lambda r: r.errors, timeout=10.0, what="the bomb rejected")
            assert "--max-config-nodes" in recorder.errors[0][1].reason
            assert len(recorder.changes) == 1 and recorder.names() == ["a"]
            path.write_text("- {name: a, uri: /models/a}\n- {name: b, uri: /models/b}\n")
            await recorder.wait_for(lambda r: len(r.changes) == 2, timeout=5.0, what="the fix")
            assert recorder.names() == ["a", "b"]
        finally:
            await w.stop()

    arun(go())


def test_a_deep_file_at_start_up_is_reported_and_the_watcher_keeps_running(tmp_path, recorder: Recorder):
    """Today the RecursionError escapes start() and the agent exits."""
    (tmp_path / "models.json").write_text(deep_json(100_000))

    async def go():
        w = ConfigWatcher(tmp_path, recorder.on_change, recorder.on_error, debounce_s=0.05)
        await w.start()
        try:
            assert recorder.changes == [] and len(recorder.errors) == 1
            assert "--max-config-depth" in recorder.errors[0][1].reason
            (tmp_path / "models.json").write_text('[{"name": "a", "uri": "/models/a"}]')
            await recorder.wait_for(lambda r: r.changes, timeout=5.0, what="the good file")
            assert recorder.names() == ["a"]
        finally:
            await w.stop()

    arun(go())
