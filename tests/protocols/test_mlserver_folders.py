"""MLServer model folders (its own convention): a model-settings.json shipped inside the model's
folder is honoured by the agent as MLServer honours it on the same folder: its version is served
under /versions/{v}, its inputs/outputs are in the metadata, under the agent's served name."""
from __future__ import annotations

from tests.protocols.conftest import SHIPPED_SETTINGS
from tests.support.agentproc import IRIS_ROW
from tests.support.models import sklearn_predictions


def _infer_body() -> dict:
    return {"inputs": [{"name": "measurements", "shape": [1, 4], "datatype": "FP64", "data": IRIS_ROW}]}


def test_metadata_shows_the_shipped_inputs_outputs_and_version_under_the_served_name(ms_agent):
    code, meta = ms_agent.get("/v2/models/folder")
    assert code == 200, meta
    assert meta["name"] == "folder"
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        (i["name"], i["datatype"], i["shape"]) for i in SHIPPED_SETTINGS["inputs"]]
    assert [o["name"] for o in meta["outputs"]] == ["predict"]
    code, versioned = ms_agent.get("/v2/models/folder/versions/v0.1.0")
    assert code == 200 and versioned["inputs"] == meta["inputs"]


def test_the_shipped_version_is_served_under_versions(ms_agent):
    want = sklearn_predictions(ms_agent.root / "store" / "folder", [IRIS_ROW])
    code, body = ms_agent.post("/v2/models/folder/versions/v0.1.0/infer", _infer_body())
    assert code == 200, body
    assert body["model_name"] == "folder" and body["model_version"] == "v0.1.0"
    assert body["outputs"][0]["data"] == want
    assert ms_agent.get("/v2/models/folder/versions/v0.1.0/ready")[0] == 200
    # the unversioned path serves the same model; the shipped name serves nothing
    assert ms_agent.post("/v2/models/folder/infer", _infer_body())[1]["outputs"][0]["data"] == want
    assert ms_agent.post("/v2/models/shipped-name/infer", _infer_body())[0] == 404


def test_what_the_agent_overrides_in_a_shipped_settings_file(tmp_path):
    """The served name and uri are the agent's; the config's version, implementation and
    parameters win over the shipped ones; a shipped uri that leaves the folder is not used."""
    import json

    from agent.runtimes.base import ServedModel
    from agent.runtimes.mlserver import model_settings
    from tests.protocols.conftest import write_shipped_folder

    folder = write_shipped_folder(tmp_path / "m")
    doc = model_settings(ServedModel(name="served", path=folder, runtime="sklearn"))
    assert doc["name"] == "served" and doc["parameters"]["uri"] == str((folder / "model.joblib").resolve())
    assert doc["parameters"]["version"] == "v0.1.0" and doc["inputs"] == SHIPPED_SETTINGS["inputs"]
    doc = model_settings(ServedModel(name="served", path=folder, runtime="sklearn", version="2",
                                     implementation="mlserver_xgboost.XGBoostModel", parameters={"extra": {"k": 1}}))
    assert doc["parameters"]["version"] == "2" and doc["implementation"] == "mlserver_xgboost.XGBoostModel"
    assert doc["parameters"]["extra"] == {"k": 1}
    escaping = dict(SHIPPED_SETTINGS, parameters={"uri": "../../etc/passwd"})
    (folder / "model-settings.json").write_text(json.dumps(escaping))
    doc = model_settings(ServedModel(name="served", path=folder, runtime="sklearn"))
    assert doc["parameters"]["uri"] == str(folder.resolve())  # the folder (model.joblib found there by name)
