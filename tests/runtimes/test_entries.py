"""What the adapters write into a repository entry (no server needed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent.runtimes import LoadFailed, ServedModel
from agent.runtimes.mlserver import model_settings, model_uri
from agent.runtimes.triton import config_text, entry_links, set_config_name

CONFIG = '''# served as "orig"
name: "orig"
backend: "python"
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }
]
output [ { name: "name: \\"tricky\\"" data_type: TYPE_FP32 dims: [ -1 ] } ]
parameters { key: "name" value: { string_value: "kept" } }
'''


def test_only_the_top_level_name_is_rewritten() -> None:
    out = set_config_name(CONFIG, "served")
    assert out.count('name: "served"') == 1
    assert 'name: "orig"' not in out and '# served as "orig"' in out  # comments untouched
    assert 'name: "INPUT0"' in out and 'name: \\"tricky\\"' in out and 'key: "name"' in out


def test_missing_top_level_name_is_added() -> None:
    out = set_config_name('backend: "python"\ninput [ { name: "X" } ]\n', "m")
    assert out.startswith('name: "m"\n') and 'name: "X"' in out


def test_triton_config_for_bare_files_and_parameters(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    m = ServedModel("o", tmp_path, "onnx", parameters={"threads": 2, "mode": "fast"})
    text = config_text(m)
    assert 'name: "o"' in text and 'backend: "onnxruntime"' in text
    assert 'key: "threads" value: { string_value: "2" }' in text and 'string_value: "fast"' in text
    assert entry_links(m) == {"1/model.onnx": str(tmp_path / "model.onnx")}
    with pytest.raises(LoadFailed, match="names no Triton backend"):
        config_text(ServedModel("x", tmp_path, "sklearn"))


def test_triton_links_the_requested_version_only(tmp_path: Path) -> None:
    for v in ("1", "2"):
        (tmp_path / v).mkdir()
    (tmp_path / "labels.txt").write_text("a\n")
    (tmp_path / "config.pbtxt").write_text('name: "x"\n')
    assert set(entry_links(ServedModel("x", tmp_path, "triton"))) == {"1", "2", "labels.txt"}
    assert set(entry_links(ServedModel("x", tmp_path, "triton", version="2"))) == {"2", "labels.txt"}


def test_triton_version_dirs_are_real_dirs_with_a_link_per_file(tmp_path: Path) -> None:
    (tmp_path / "1" / "sub").mkdir(parents=True)
    (tmp_path / "1" / "model.py").write_text("x")
    (tmp_path / "1" / "sub" / "helper.py").write_text("y")
    (tmp_path / "2").mkdir()  # empty: linked as is
    assert entry_links(ServedModel("x", tmp_path, "triton")) == {
        "1/model.py": str(tmp_path / "1" / "model.py"),
        "1/sub/helper.py": str(tmp_path / "1" / "sub" / "helper.py"),
        "2": str(tmp_path / "2"),
    }


def test_mlserver_uri_points_at_the_model_file(tmp_path: Path) -> None:
    wellknown = tmp_path / "a"
    wellknown.mkdir()
    (wellknown / "model.joblib").write_bytes(b"x")
    other = tmp_path / "b"
    other.mkdir()
    (other / "clf-v3.pkl").write_bytes(b"x")
    (other / "README").write_text("")
    assert model_uri(ServedModel("a", wellknown, "sklearn")) == str(wellknown)  # the runtime finds it
    assert model_uri(ServedModel("b", other, "sklearn")) == str(other / "clf-v3.pkl")
    doc = model_settings(ServedModel("b", other, "sklearn", version="4", parameters={"extra": {"k": 1}, "uri": "ignored"}))
    assert doc == {
        "name": "b",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": str(other / "clf-v3.pkl"), "version": "4", "extra": {"k": 1}},
    }
