"""puller.record: the value classes the puller declares like dataclasses (PullOptions, Listing,
S3Settings, Entry...) keep what callers relied on from dataclasses: construction by position or
name with defaults (a fresh one per instance from a Factory), a clear TypeError for a missing or
unknown field, equality and hashing by value, frozen instances, replace / astuple."""
from __future__ import annotations

from pathlib import Path

import pytest

from puller.cache import Entry, GCReport
from puller.credentials import S3Settings
from puller.record import FrozenInstanceError, astuple, replace
from puller.sources.base import Listing, PullOptions, RemoteObject


def test_fields_by_position_or_name_with_defaults_and_clear_errors() -> None:
    a = RemoteObject("w.bin", 3, identity='"e1"')
    assert (a.path, a.size, a.identity, a.checksum) == ("w.bin", 3, '"e1"', None)
    assert astuple(a) == ("w.bin", 3, '"e1"', None)
    assert repr(a) == "RemoteObject(path='w.bin', size=3, identity='\"e1\"', checksum=None)"
    with pytest.raises(TypeError, match="missing field 'size'"):
        RemoteObject("w.bin")
    with pytest.raises(TypeError, match="no field 'sise'"):
        RemoteObject("w.bin", sise=3)
    with pytest.raises(TypeError, match="'path' twice"):
        RemoteObject("w.bin", 3, path="x")
    with pytest.raises(TypeError, match="takes 4 fields, 5 given"):
        RemoteObject("w.bin", 3, "", None, "extra")


def test_frozen_records_compare_and_hash_by_value_and_refuse_assignment() -> None:
    a, b = RemoteObject("w.bin", 3), RemoteObject("w.bin", 3)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != RemoteObject("w.bin", 4) and a != ("w.bin", 3, "", None)
    listing = Listing(uri="s3://b/m", objects=(a,))
    assert listing.total_bytes == 3 and listing == Listing("s3://b/m", (b,))
    with pytest.raises(FrozenInstanceError):
        a.size = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):  # FrozenInstanceError is one, as dataclasses' is
        del listing.uri
    entry = Entry(key="k", path=Path("/x"), uri="s3://b/m", size=3, files=("w.bin",))
    assert (entry.in_place, entry.hit) == (False, False)
    assert replace(entry, hit=True).hit is True and entry.hit is False


def test_mutable_records_get_fresh_defaults_and_are_not_hashable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSHELF_PVC_ROOT", "/pvcs")
    a, b = PullOptions(), PullOptions(sha256=None)
    assert a == b and a.pvc_root == Path("/pvcs")
    a.headers["X"] = "1"  # type: ignore[index]
    assert b.headers == {}  # each instance its own dict
    a.storage_config_dir = Path("/cfg")
    assert a.storage_config_dir == Path("/cfg") and a != b
    with pytest.raises(TypeError):
        hash(a)
    report = GCReport(budget=10)
    report.removed.append("x")  # type: ignore[arg-type]
    assert GCReport(budget=10).removed == []


def test_s3_settings_never_show_secrets_and_replace_keeps_them() -> None:
    s = S3Settings(source="env", access_key_id="AKIAEXAMPLEKEY", secret_access_key="very-secret", session_token="tok")
    shown = repr(s)
    assert "very-secret" not in shown and "tok'" not in shown and "AKIAEXAMPLEKEY" not in shown
    assert "access_key_id='AKIA****'" in shown and str(s) == shown
    moved = replace(s, region="eu-west-2")
    assert moved.secret_access_key == "very-secret" and moved.region == "eu-west-2" and s.region is None
