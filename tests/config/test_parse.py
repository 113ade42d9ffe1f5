"""Model config parsing and validation: every field and alias, both formats, every rejection
with the message a user acts on, and files that do not parse at all."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from agent.config import ConfigParseError, ModelSpec, load_config_dir, parse_config
from tests.support.configmap import ConfigMapDir

SHA = "ab" * 32


def one_error(text: str, filename: str = "models.yaml"):
    """Parse a config whose one bad entry sits between two good ones; return that error."""
    result = parse_config(text, filename)
    assert len(result.errors) == 1, [str(e) for e in result.errors]
    return result, result.errors[0]


def with_neighbours(bad_yaml_entry: str) -> str:
    return (
        "- {name: before, uri: s3://bucket/before}\n"
        f"- {bad_yaml_entry}\n"
        "- {name: after, uri: s3://bucket/after}\n"
    )


# --------------------------------------------------------------------------- fields


def test_every_native_field_is_read():
    text = f"""
- name: iris
  uri: s3://models/iris/
  runtime: mlserver
  implementation: my_pkg.models.IrisModel
  version: "v3"
  memory: 512Mi
  gpuMemory: 1G
  pinned: true
  preload: false
  sha256: {SHA.upper()}
  storageKey: minio
  parameters: {{threads: 2, labels: [a, b]}}
"""
    result = parse_config(text, "models.yaml")
    assert result.errors == ()
    assert result.file == "models.yaml"
    assert result.models == {"iris": ModelSpec(
        name="iris", source="s3://models/iris/", runtime="mlserver", implementation="my_pkg.models.IrisModel",
        version="v3", memory=512 * 2**20, gpu_memory=10**9, pinned=True, preload=False, sha256=SHA,
        storage_key="minio", parameters={"threads": 2, "labels": ["a", "b"]},
    )}


def test_defaults():
    spec = parse_config("- {name: m, uri: /models/m}", "models.yaml").models["m"]
    assert (spec.runtime, spec.implementation, spec.version, spec.memory, spec.gpu_memory) == ("sklearn", None, None, None, None)
    assert (spec.pinned, spec.preload, spec.sha256, spec.storage_key, dict(spec.parameters)) == (False, True, None, None, {})


def test_aliases_storageUri_gpu_memory_storage_key():
    text = "- {name: m, storageUri: gs://bkt/m, gpu_memory: 2Gi, storage_key: gcs-prod}"
    spec = parse_config(text, "models.yaml").models["m"]
    assert (spec.source, spec.gpu_memory, spec.storage_key) == ("gs://bkt/m", 2 * 2**30, "gcs-prod")


def test_alias_and_canonical_key_together_is_rejected():
    _, err = one_error(with_neighbours("{name: m, uri: /a, storageUri: /b}"))
    assert err.reason == "uri and storageUri are the same field: give one of them"


def test_mapping_form_and_version_number():
    text = json.dumps({"models": [{"name": "m", "uri": "https://host/m/model.joblib", "version": 2, "runtime": "XGBoost"}]})
    spec = parse_config(text, "models.json").models["m"]
    assert (spec.version, spec.runtime) == ("2", "xgboost")


def test_sha256_prefix_is_accepted():
    spec = parse_config(f"- {{name: m, uri: /m, sha256: 'sha256:{SHA}'}}", "models.yaml").models["m"]
    assert spec.sha256 == SHA


@pytest.mark.parametrize("text,expected", [
    ("512Mi", 512 * 2**20), ("1G", 10**9), ("1.5Gi", int(1.5 * 2**30)), ("1048576", 1048576),
    (4096, 4096), ("2GiB", 2 * 2**30), ("100k", 100_000),
])
def test_quantities(text, expected):
    value = json.dumps(text)
    spec = parse_config(f"- {{name: m, uri: /m, memory: {value}, gpuMemory: {value}}}", "models.yaml").models["m"]
    assert spec.memory == spec.gpu_memory == expected


@pytest.mark.parametrize("value,reason", [
    ("'12XB'", "memory: not a quantity: '12XB' (expected e.g. 512Mi, 1G, 1048576)"),
    ("500m", "memory: not a quantity: '500m' (expected e.g. 512Mi, 1G, 1048576)"),
    ("-1", "memory: negative quantity: -1 (expected e.g. 512Mi, 1G, 1048576)"),
    ("0", "memory: must be more than 0 bytes, got 0 (expected e.g. 512Mi, 1G, 1048576)"),
    ("true", "memory: not a quantity: True (expected e.g. 512Mi, 1G, 1048576)"),
])
def test_bad_quantities(value, reason):
    result, err = one_error(with_neighbours(f"{{name: iris, uri: /m, memory: {value}}}"))
    assert err.reason == reason
    assert sorted(result.models) == ["after", "before"]


def test_the_message_a_user_reads():
    text = "\n".join(f"- {{name: m{i}, uri: /m{i}}}" for i in range(3)) + "\n- {name: iris, uri: /iris, memory: 12XB}\n"
    _, err = one_error(text)
    assert (err.file, err.model, err.index) == ("models.yaml", "iris", 3)
    assert str(err) == "models.yaml[3] (name 'iris'): memory: not a quantity: '12XB' (expected e.g. 512Mi, 1G, 1048576)"


def test_sub_model_mapping_is_a_sorted_tuple():
    text = "- name: pipeline\n  uri: {tokenizer: 's3://bkt/tok/', model: 'gs://bkt/model/', extra: /opt/extra}\n"
    spec = parse_config(text, "models.yaml").models["pipeline"]
    assert spec.source == (("extra", "/opt/extra"), ("model", "gs://bkt/model/"), ("tokenizer", "s3://bkt/tok/"))
    assert spec.uri == {"extra": "/opt/extra", "model": "gs://bkt/model/", "tokenizer": "s3://bkt/tok/"}


def test_sub_model_mapping_failures():
    _, err = one_error(with_neighbours("{name: p, uri: {tok: 's3://', model: /m}}"))
    assert err.reason.startswith("uri.tok: bad URI 's3://'")
    _, err = one_error(with_neighbours("{name: p, uri: {'../up': /m}}"))
    assert err.reason.startswith("uri.../up: '../up' is not a safe model name")
    _, err = one_error(with_neighbours("{name: p, uri: {}}"))
    assert err.reason == "uri: empty mapping (give a URI, or sub-model name -> URI pairs)"


def test_parameters_pass_through_and_must_be_a_mapping():
    spec = parse_config("- {name: m, uri: /m, parameters: {content_type: np, extra: {a: 1}}}", "models.yaml").models["m"]
    assert spec.parameters == {"content_type": "np", "extra": {"a": 1}}
    _, err = one_error(with_neighbours("{name: m, uri: /m, parameters: [1, 2]}"))
    assert err.reason == "parameters: expected a mapping, got list [1, 2]"


def test_documented_free_form_keys_are_ignored():
    text = "- {name: m, uri: /m, description: 'the iris one', labels: {team: a}, x-owner: bob}"
    result = parse_config(text, "models.yaml")
    assert result.errors == () and list(result.models) == ["m"]


# --------------------------------------------------------------------------- KServe models.json


def test_kserve_models_json_as_is():
    text = json.dumps([
        {"modelName": "m1", "modelSpec": {"storageUri": "s3://bucket/m1", "framework": "sklearn", "memory": "1G"}},
        {"modelName": "m2", "modelSpec": {"storageUri": "gs://bucket/m2", "framework": "xgboost", "memory": "256Mi"}},
    ])
    result = parse_config(text, "models.json")
    assert result.errors == ()
    assert result.models["m1"] == ModelSpec(name="m1", source="s3://bucket/m1", runtime="sklearn", memory=10**9)
    assert (result.models["m2"].runtime, result.models["m2"].memory) == ("xgboost", 256 * 2**20)


@pytest.mark.parametrize("framework,runtime", [
    ("tensorflow", "tensorflow"), ("pytorch", "pytorch"), ("onnx", "onnx"), ("triton", "triton"),
    ("lightgbm", "lightgbm"), ("SKLearn", "sklearn"),
])
def test_kserve_frameworks_map_to_runtimes(framework, runtime):
    text = json.dumps([{"modelName": "m", "modelSpec": {"storageUri": "/m", "framework": framework, "memory": "1Gi"}}])
    assert parse_config(text, "models.json").models["m"].runtime == runtime


def test_kserve_unknown_framework_and_bad_entries():
    text = json.dumps([
        {"modelName": "ok", "modelSpec": {"storageUri": "/m", "framework": "sklearn", "memory": "1G"}},
        {"modelName": "p", "modelSpec": {"storageUri": "/m", "framework": "pmml", "memory": "1G"}},
        {"modelName": "q", "modelSpec": {"storageUri": "/m", "framwork": "sklearn"}},
        {"modelName": "r", "modelSpec": {"framework": "sklearn"}},
        {"modelName": "s", "modelSpec": {"storageUri": "/m", "framework": "sklearn", "memory": "lots"}},
    ])
    result = parse_config(text, "models.json")
    assert list(result.models) == ["ok"]
    reasons = {e.model: e.reason for e in result.errors}
    assert reasons["p"].startswith("modelSpec.framework: 'pmml' is not supported (supported: catboost, huggingface,")
    assert reasons["q"] == "modelSpec: unknown key(s) 'framwork' (known: framework, memory, storageUri)"
    assert reasons["r"] == "modelSpec.storageUri: missing"
    assert reasons["s"] == "modelSpec.memory: not a quantity: 'lots' (expected e.g. 512Mi, 1G, 1048576)"


def test_kserve_and_native_entries_mix_and_share_names():
    text = json.dumps([
        {"modelName": "m", "modelSpec": {"storageUri": "/a", "framework": "sklearn", "memory": "1G"}},
        {"name": "m", "uri": "/b"},
    ])
    result = parse_config(text, "models.json")
    assert result.models["m"].source == "/a"
    assert str(result.errors[0]) == "models.json[1] (name 'm'): duplicate name: models.json[0] already defines 'm'; this entry is ignored"


# --------------------------------------------------------------------------- entry validation


@pytest.mark.parametrize("entry,reason", [
    ("{name: 'a/b', uri: /m}", "name: 'a/b' is not a safe model name"),
    ("{name: 'a..b', uri: /m}", "name: 'a..b' is not a safe model name"),
    ("{name: '-lead', uri: /m}", "name: '-lead' is not a safe model name"),
    ("{name: 'sp ace', uri: /m}", "name: 'sp ace' is not a safe model name"),
    (f"{{name: {'x' * 129}, uri: /m}}", f"name: '{'x' * 129}' is not a safe model name"),
    ("{name: 12, uri: /m}", "name: expected a string, got int 12 (quote it in YAML)"),
    ("{uri: /m}", "name: missing"),
    ("{name: m}", "uri: missing (or storageUri)"),
    ("{name: m, uri: 'ftp://host/m'}", "uri: bad URI 'ftp://host/m': unsupported scheme 'ftp'"),
    ("{name: m, uri: 'models/iris'}", "uri: bad URI 'models/iris': no scheme"),
    ("{name: m, uri: 's3:///key'}", "uri: bad URI 's3:///key': missing bucket name"),
    ("{name: m, uri: 'https://user:hunter2@host/m.joblib?x=1', runtime: sklaern}", "runtime: unknown runtime 'sklaern' (known: "),
    ("{name: m, uri: /m, memroy: 1G}", "unknown key 'memroy'; known: gpuMemory, gpu_memory, implementation, memory, name,"),
    ("{name: m, uri: /m, modelName: m}", "unknown key 'modelName' (a KServe entry needs both modelName and modelSpec); known:"),
    ("{name: m, uri: /m, runtime: mlserver}", "implementation: missing; runtime 'mlserver' needs the MLServer class path"),
    ("{name: m, uri: /m, runtime: mlserver, implementation: 'not a class'}", "implementation: 'not a class' is not a class path"),
    ("{name: m, uri: /m, sha256: abc}", "sha256: expected 64 hex digits, got 'abc'"),
    ("{name: m, uri: /m, pinned: 'yes please'}", "pinned: expected true or false, got 'yes please'"),
    ("{name: m, uri: /m, preload: 1}", "preload: expected true or false, got int 1"),
    ("{name: m, uri: /m, version: 1.5}", "version: expected a string, got float 1.5 (quote it in YAML)"),
    ("{name: m, uri: /m, storageKey: ''}", "storageKey: empty string"),
    ("{name: m, uri: 42}", "uri: expected a URI string, got int 42"),
    ("just-a-string", "expected a mapping with name and uri, got 'just-a-string'"),
])
def test_each_rejection_names_the_field_and_the_others_apply(entry, reason):
    result, err = one_error(with_neighbours(entry))
    assert err.reason.startswith(reason), err.reason
    assert err.index == 1 and err.file == "models.yaml"
    assert sorted(result.models) == ["after", "before"]


def test_credentials_never_reach_a_message():
    result, err = one_error(with_neighbours("{name: m, uri: 'ftp://user:hunter2@host/m'}"))
    assert "hunter2" not in str(err)
    assert "ftp://***@host/m" in err.reason


def test_duplicates_reject_the_later_ones_naming_both_indexes():
    text = "- {name: a, uri: /1}\n- {name: b, uri: /2}\n- {name: a, uri: /3}\n- {name: a, uri: /4}\n"
    result = parse_config(text, "models.yaml")
    assert result.models["a"].source == "/1" and sorted(result.models) == ["a", "b"]
    assert [str(e) for e in result.errors] == [
        "models.yaml[2] (name 'a'): duplicate name: models.yaml[0] already defines 'a'; this entry is ignored",
        "models.yaml[3] (name 'a'): duplicate name: models.yaml[0] already defines 'a'; this entry is ignored",
    ]


def test_a_name_belongs_to_its_first_entry_even_when_that_one_is_bad():
    text = "- {name: a, uri: /1, memory: 12XB}\n- {name: a, uri: /2}\n"
    result = parse_config(text, "models.yaml")
    assert result.models == {}
    assert [e.index for e in result.errors] == [0, 1]


def test_extra_top_level_keys_are_reported():
    result = parse_config("models: [{name: m, uri: /m}]\nmodel: [{name: typo, uri: /t}]\n", "models.yaml")
    assert list(result.models) == ["m"]
    assert str(result.errors[0]) == "models.yaml: top-level key(s) 'model' ignored (only 'models' is read)"


def test_empty_lists_are_an_empty_set():
    assert parse_config("[]", "models.json").models == {}
    assert parse_config("models: []\n", "models.yaml").models == {}
    assert parse_config("models:\n", "models.yaml").models == {}


# --------------------------------------------------------------------------- files that do not parse


@pytest.mark.parametrize("text,filename,reason", [
    ("- {name: a, uri: /m\n", "models.yaml", "not valid YAML: "),
    ("- name: a\n  uri: /m\n - name: b\n", "models.yaml", "not valid YAML: "),
    ('[{"name": "a",}]', "models.json", "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 15"),
    ("just a string\n", "models.yaml", "top level must be a list of models or a mapping with 'models', got str"),
    ("42", "models.json", "top level must be a list of models or a mapping with 'models', got int"),
    ("name: m\nuri: /m\n", "models.yaml", "a mapping at the top needs a 'models' list (found keys 'name', 'uri')"),
    ("models: {name: m}\n", "models.yaml", "'models' must be a list, got dict"),
    ("", "models.yaml", "empty document (write [] or 'models: []' to serve no models"),
    ("# only a comment\n", "models.yaml", "empty document"),
])
def test_a_file_that_does_not_parse_raises(text, filename, reason):
    with pytest.raises(ConfigParseError) as info:
        parse_config(text, filename)
    assert info.value.file == filename
    assert info.value.reason.startswith(reason), info.value.reason


def test_yaml_errors_say_where():
    with pytest.raises(ConfigParseError) as info:
        parse_config("models:\n  - {name: a, uri: /m\n  - {name: b}\n", "models.yaml")
    assert " at line " in info.value.reason and " column " in info.value.reason


# --------------------------------------------------------------------------- directories


def test_no_config_file_is_an_empty_set(tmp_path):
    (tmp_path / "README").write_text("not a config")
    result = load_config_dir(tmp_path)
    assert (result.models, result.errors, result.file) == ({}, (), None)


@pytest.mark.parametrize("present,chosen", [
    (["models.json"], "models.json"), (["models.yml"], "models.yml"), (["models.yml", "models.json"], "models.yml"),
])
def test_file_names_in_order(tmp_path, present, chosen):
    for name in present:
        (tmp_path / name).write_text(json.dumps([{"name": name.replace(".", "-"), "uri": "/m"}]))
    result = load_config_dir(tmp_path)
    assert result.file == chosen and list(result.models) == [chosen.replace(".", "-")]


def test_two_files_use_the_first_and_say_which_was_ignored(tmp_path):
    (tmp_path / "models.yaml").write_text("- {name: from-yaml, uri: /y}\n")
    (tmp_path / "models.json").write_text('[{"name": "from-json", "uri": "/j"}]')
    result = load_config_dir(tmp_path)
    assert result.file == "models.yaml" and list(result.models) == ["from-yaml"]
    assert [str(e) for e in result.errors] == ["models.yaml: models.json ignored: models.yaml is read first (keep one config file)"]


def test_digest_is_sha256_of_the_file_bytes(tmp_path):
    data = b"# iris\n- {name: iris, uri: /models/iris}\n"
    (tmp_path / "models.yaml").write_bytes(data)
    assert load_config_dir(tmp_path).digest == hashlib.sha256(data).hexdigest()
    (tmp_path / "models.yaml").write_bytes(data + b"\n")
    assert load_config_dir(tmp_path).digest == hashlib.sha256(data + b"\n").hexdigest()


def test_configmap_dir_is_read_through_the_normal_names(tmp_path):
    cm = ConfigMapDir(tmp_path / "cm")
    cm.write({"models.json": json.dumps([{"modelName": "k", "modelSpec": {"storageUri": "/k", "framework": "sklearn", "memory": "1G"}}])})
    cm.write({"models.json": json.dumps([{"modelName": "k2", "modelSpec": {"storageUri": "/k", "framework": "sklearn", "memory": "1G"}}])})
    assert any(n.startswith("..2") for n in os.listdir(cm.root)) and os.path.islink(cm.root / "..data")
    result = load_config_dir(cm.root)
    assert result.file == "models.json" and list(result.models) == ["k2"] and result.errors == ()


def test_dotfiles_are_ignored(tmp_path):
    (tmp_path / ".models.yaml.swp").write_text("garbage: [")
    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / "models.yaml").write_text("- {name: hidden, uri: /h}\n")
    assert load_config_dir(tmp_path).file is None


def test_missing_dir_and_unreadable_bytes_raise(tmp_path):
    with pytest.raises(ConfigParseError, match="config directory does not exist"):
        load_config_dir(tmp_path / "nope")
    (tmp_path / "models.yaml").write_bytes(b"- {name: m, uri: /m}\n\xff\xfe")
    with pytest.raises(ConfigParseError) as info:
        load_config_dir(tmp_path)
    assert (info.value.file, info.value.reason) == ("models.yaml", "not UTF-8 text (byte 21)")


def test_an_unchanged_entry_keeps_its_spec_and_a_value_of_another_type_is_validated_anew():
    """The parser reuses the ModelSpec of an entry whose raw content is unchanged (the
    reconciler skips it by identity); 1 == True in Python, so the type is part of that content."""
    first = parse_config("- {name: a, uri: /m/a, preload: true}\n- {name: b, uri: /m/b, parameters: {x: [1]}}\n", "models.yaml")
    again = parse_config("- {name: a, uri: /m/a, preload: true}\n- {name: b, uri: /m/b, parameters: {x: [1]}}\n", "models.yaml")
    assert again.models["a"] is first.models["a"] and again.models["b"] is first.models["b"]
    result, err = one_error(with_neighbours("{name: a, uri: /m/a, preload: 1}"))
    assert "preload: expected true or false, got int 1" in err.reason
    changed = parse_config("- {name: b, uri: /m/b, parameters: {x: [1.5]}}\n", "models.yaml")
    assert changed.models["b"].parameters == {"x": [1.5]}


def test_an_edit_validates_only_changed_entries_and_the_reuse_stays_bounded():
    """Unchanged entries keep their ModelSpec object (the reconciler skips them by identity),
    a reverted entry gets a spec equal to its content (never a neighbour's), `preload: 0` is not
    taken for `preload: false`, and the reuse cache holds at most ~2x the file's entries."""
    import agent.config as config

    def doc(version: str, preload: object = False) -> str:
        models = [{"name": f"m{i}", "uri": f"/models/m{i}", "preload": preload if i == 0 else False} for i in range(50)]
        models[7]["version"] = version
        return json.dumps(models)

    first = parse_config(doc("v1"), "models.json")
    second = parse_config(doc("v2"), "models.json")
    assert all(second.models[f"m{i}"] is first.models[f"m{i}"] for i in range(50) if i != 7)
    assert second.models["m7"].version == "v2"
    for n in range(200):  # many edits: contents of old files do not pile up
        parse_config(doc(f"x{n}"), "models.json")
    assert len(config._previous) <= 2 * 50 + 64
    back = parse_config(doc("v1"), "models.json")
    assert back.models["m7"].version == "v1" and back.models["m7"] == first.models["m7"]
    wrong = parse_config(doc("v1", preload=0), "models.json")  # 0 == False in Python
    assert "m0" not in wrong.models and wrong.errors  # 0 is not a boolean, even after `false` parsed


def test_an_entry_seen_before_still_loses_to_an_earlier_entry_of_its_name():
    """An unchanged entry skips validation, not the name check: a copy of it, or one after a
    bad entry of the same name, is still rejected as a duplicate."""
    good = "- {name: a, uri: /m/a}\n"
    parse_config(good, "models.yaml")  # its spec is now remembered
    twice = parse_config(good + good, "models.yaml")
    assert [str(e) for e in twice.errors] == [
        "models.yaml[1] (name 'a'): duplicate name: models.yaml[0] already defines 'a'; this entry is ignored"]
    behind_bad = parse_config("- {name: a, uri: /m/a, memory: 12XB}\n" + good, "models.yaml")
    assert behind_bad.models == {} and [e.index for e in behind_bad.errors] == [0, 1]
    assert "duplicate name" in behind_bad.errors[1].reason
