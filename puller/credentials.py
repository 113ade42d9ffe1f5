"""Resolve how to reach an S3-compatible store (S3, GCS's XML API, rclone s3 remotes).

Order, first match wins:
  1. storage-config dir: ``<options.storage_config_dir>/<options.storage_key>`` (or ``<key>.json``),
     JSON ``{"type": "s3"|"gs", "access_key_id", "secret_access_key", "endpoint_url", "region",
     "bucket", "anonymous", "verify_ssl", "ca_bundle", "addressing_style"}``.
  2. rclone remote (``remote:bucket/path`` URIs only): ``RCLONE_CONFIG_<REMOTE>_TYPE=s3`` plus
     ``_ACCESS_KEY_ID``, ``_SECRET_ACCESS_KEY``, ``_SESSION_TOKEN``, ``_ENDPOINT``, ``_PROVIDER``,
     ``_REGION``, ``_ENV_AUTH``, ``_FORCE_PATH_STYLE``.
  3. an s3cmd ``.s3cfg`` (``options.s3cfg`` or ``$S3CFG``): host_base, host_bucket, access_key,
     secret_key, access_token, use_https, bucket_location, check_ssl_certificate, ca_certs_file.
  4. gs:// only: HMAC keys from ``GCS_HMAC_ACCESS_KEY_ID`` / ``GCS_HMAC_SECRET``, else anonymous.
     Endpoint ``https://storage.googleapis.com`` or ``$MODELSHELF_GCS_ENDPOINT``.
  5. s3:// : the AWS default chain (env, shared config/profile, web identity / IRSA, ...) with
     ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / ``S3_ENDPOINT`` (+``S3_USE_HTTPS``); anonymous
     when ``AWS_NO_SIGN_REQUEST`` is true or the chain has no credentials at all.

Everywhere: ``AWS_CA_BUNDLE`` (CA bundle path), ``S3_VERIFY_SSL=0`` (no TLS verification),
``AWS_S3_FORCE_PATH_STYLE`` / ``S3_FORCE_PATH_STYLE`` (path-style addressing; the default for any
custom endpoint), ``AWS_S3_ADDRESSING_STYLE`` (path|virtual|auto).

The resulting S3Settings never shows secrets in repr/str; `secret_values()` lists them so error
paths can scrub foreign messages.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from collections.abc import Mapping
TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up
if TYPE_CHECKING:
    from typing import Any

from puller.errors import AccessDenied, BadURI
from puller.logs import get_logger
from puller.record import Record, replace

if TYPE_CHECKING:
    from puller.sources.base import PullOptions
    from puller.uri import ParsedURI

log = get_logger("modelshelf.puller.credentials")  # logging imported on first use (puller.logs)

GCS_ENDPOINT = "https://storage.googleapis.com"
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}
_SECRET_FIELDS = ("access_key_id", "secret_access_key", "session_token")


class S3Settings(Record):
    """Connection settings for one S3-compatible endpoint. repr/str never show secrets."""

    source: str  # where they came from, e.g. "storage-config:minio", "rclone:remote", "aws-default-chain"
    endpoint_url: str | None = None  # None: AWS's own endpoint for the region
    region: str | None = None
    access_key_id: str | None = None  # (repr masks it, and the two secrets below)
    secret_access_key: str | None = None
    session_token: str | None = None
    anonymous: bool = False
    addressing_style: str = "auto"  # "path" | "virtual" | "auto"
    verify: bool | str = True  # False: no TLS verification; str: CA bundle path
    profile: str | None = None  # AWS shared-config profile (default chain only)
    bucket: str | None = None  # a bucket the storage config is bound to, if any
    is_gcs: bool = False

    def __repr__(self) -> str:
        shown = []
        for name in self._fields:
            value = getattr(self, name)
            if name == "access_key_id":
                value = _mask(value)
            elif name in _SECRET_FIELDS:
                value = "***" if value else None
            shown.append(f"{name}={value!r}")
        return f"S3Settings({', '.join(shown)})"

    __str__ = __repr__

    def secret_values(self) -> list[str]:
        """Values that must never appear in logs or errors (secret, token, and the key id)."""
        return [v for v in (self.secret_access_key, self.session_token, self.access_key_id) if v]


def _mask(value: str | None) -> str | None:
    if not value:
        return value
    return value[:4] + "****" if len(value) > 8 else "****"


def _bool(value: Any, default: bool | None = None) -> bool | None:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return default


def _env(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value:
            return value
    return None


def resolve_s3(parsed: "ParsedURI", options: "PullOptions", env: Mapping[str, str] | None = None) -> S3Settings:
    """Settings for an s3://, gs:// or rclone URI. Raises BadURI / AccessDenied with clear messages."""
    env = os.environ if env is None else env
    if parsed.scheme == "rclone":
        settings = _from_rclone(parsed, env)
    else:
        settings = (_from_storage_config(parsed, options)
                    or _from_s3cfg(parsed, options, env)
                    or (_from_gcs_env(env) if parsed.scheme == "gs" else _from_aws_env(env)))
    return _apply_global(settings, env)


# -- 1. storage-config dir ---------------------------------------------------------------

def _from_storage_config(parsed: "ParsedURI", options: "PullOptions") -> S3Settings | None:
    key = options.storage_key
    if not key:
        return None
    root = options.storage_config_dir
    if root is None:
        raise BadURI(f"storage key {key!r} given for {parsed.redacted} but no storage-config dir is set "
                     "(MODELSHELF_STORAGE_CONFIG_DIR)", uri=parsed.redacted)
    if "/" in key or key in (".", ".."):
        raise BadURI(f"invalid storage key {key!r}", uri=parsed.redacted)
    path = next((p for p in (Path(root) / key, Path(root) / f"{key}.json") if p.is_file()), None)
    if path is None:
        raise BadURI(f"storage key {key!r} not found in {root} (looked for {key} and {key}.json)",
                     uri=parsed.redacted)
    import json  # a storage config only: not on a pull's path to its first request

    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        # never echo the file: it holds secrets; name the position only
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise BadURI(f"storage key {key!r}: {path} is not valid JSON{where}", uri=parsed.redacted) from None
    if not isinstance(cfg, dict):
        raise BadURI(f"storage key {key!r}: {path} must hold a JSON object", uri=parsed.redacted)
    kind = str(cfg.get("type", "s3")).lower()
    want = {"s3": ("s3",), "gs": ("gs", "gcs"), "rclone": ("s3",)}[parsed.scheme]
    if kind not in want:
        raise BadURI(f"storage key {key!r} has type {kind!r}, which cannot serve a {parsed.scheme}:// URI",
                     uri=parsed.redacted)
    is_gcs = parsed.scheme == "gs"
    endpoint = cfg.get("endpoint_url") or cfg.get("endpoint") or (_gcs_endpoint(os.environ) if is_gcs else None)
    style = cfg.get("addressing_style") or ("path" if _bool(cfg.get("force_path_style")) else "auto")
    verify: bool | str = True
    if cfg.get("ca_bundle"):
        verify = str(cfg["ca_bundle"])
    if _bool(cfg.get("verify_ssl"), True) is False:
        verify = False
    return S3Settings(
        source=f"storage-config:{key}", endpoint_url=endpoint,
        region=cfg.get("region") or ("auto" if is_gcs else None),
        access_key_id=cfg.get("access_key_id"), secret_access_key=cfg.get("secret_access_key"),
        session_token=cfg.get("session_token"),
        anonymous=bool(_bool(cfg.get("anonymous"), False)) or not cfg.get("access_key_id"),
        addressing_style=style, verify=verify, bucket=cfg.get("bucket"), is_gcs=is_gcs)


# -- 2. rclone remote --------------------------------------------------------------------

def _rclone_var(env: Mapping[str, str], remote: str, option: str) -> str | None:
    names = {f"RCLONE_CONFIG_{remote.upper()}_{option}",
             "RCLONE_CONFIG_" + re.sub(r"[^A-Z0-9]", "_", remote.upper()) + f"_{option}"}
    return _env(env, *sorted(names))


def _from_rclone(parsed: "ParsedURI", env: Mapping[str, str]) -> S3Settings:
    remote = parsed.remote
    kind = _rclone_var(env, remote, "TYPE")
    if not kind:
        raise BadURI(f"rclone remote {remote!r} is not configured: set "
                     f"RCLONE_CONFIG_{remote.upper()}_TYPE=s3 and its _ACCESS_KEY_ID/_SECRET_ACCESS_KEY/_ENDPOINT",
                     uri=parsed.redacted)
    if kind.lower() != "s3":
        raise BadURI(f"rclone remote {remote!r} has type {kind!r}; only s3-type remotes are supported",
                     uri=parsed.redacted)
    provider = (_rclone_var(env, remote, "PROVIDER") or "AWS").lower()
    endpoint = _rclone_var(env, remote, "ENDPOINT")
    if endpoint and "://" not in endpoint:
        endpoint = "https://" + endpoint
    key_id = _rclone_var(env, remote, "ACCESS_KEY_ID")
    secret = _rclone_var(env, remote, "SECRET_ACCESS_KEY")
    env_auth = _bool(_rclone_var(env, remote, "ENV_AUTH"), False)
    region = _rclone_var(env, remote, "REGION")
    # rclone's force_path_style defaults to true; with provider AWS and no endpoint virtual is fine too
    path_style = _bool(_rclone_var(env, remote, "FORCE_PATH_STYLE"), True)
    if env_auth and not key_id:
        base = _from_aws_env(env)
        return S3Settings(source=f"rclone:{remote}+aws-default-chain", endpoint_url=endpoint or base.endpoint_url,
                          region=region or base.region, anonymous=base.anonymous, profile=base.profile,
                          addressing_style="path" if path_style else "auto")
    return S3Settings(
        source=f"rclone:{remote}", endpoint_url=endpoint,
        region=region or ("auto" if provider == "gcs" else None),
        access_key_id=key_id, secret_access_key=secret,
        session_token=_rclone_var(env, remote, "SESSION_TOKEN"),
        anonymous=not key_id, addressing_style="path" if path_style else "auto",
        is_gcs=provider == "gcs")


# -- 3. s3cmd .s3cfg ---------------------------------------------------------------------

def _from_s3cfg(parsed: "ParsedURI", options: "PullOptions", env: Mapping[str, str]) -> S3Settings | None:
    path = options.s3cfg or (Path(env["S3CFG"]) if env.get("S3CFG") else None)
    if path is None:
        return None
    path = Path(path).expanduser()
    import configparser  # only for an .s3cfg: not on every S3 pull's start-up

    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        raise BadURI(f".s3cfg file {path} does not exist", uri=parsed.redacted) from None
    except (OSError, configparser.Error) as e:
        # configparser errors may quote a line of the file: do not pass them on
        raise BadURI(f".s3cfg file {path} cannot be read ({type(e).__name__})", uri=parsed.redacted) from None
    if not parser.has_section("default"):
        raise BadURI(f".s3cfg file {path} has no [default] section", uri=parsed.redacted)
    sec = parser["default"]
    host_base = (sec.get("host_base") or "s3.amazonaws.com").strip()
    host_bucket = (sec.get("host_bucket") or "").strip()
    use_https = _bool(sec.get("use_https"), True)
    endpoint: str | None
    if "://" in host_base:
        endpoint = host_base
    elif host_base in ("s3.amazonaws.com", "amazonaws.com"):
        endpoint = None
    else:
        endpoint = ("https://" if use_https else "http://") + host_base
    if parsed.scheme == "gs" and endpoint is None:
        endpoint = _gcs_endpoint(env)
    region = (sec.get("bucket_location") or "").strip() or None
    if region in ("US", "us"):
        region = "us-east-1"
    if region == "EU":
        region = "eu-west-1"
    style = "virtual" if "%(bucket)s" in host_bucket else ("path" if endpoint else "auto")
    verify: bool | str = True
    if sec.get("ca_certs_file", "").strip():
        verify = sec["ca_certs_file"].strip()
    if _bool(sec.get("check_ssl_certificate"), True) is False:
        verify = False
    key_id = (sec.get("access_key") or "").strip() or None
    return S3Settings(
        source=f"s3cfg:{path}", endpoint_url=endpoint, region=region or ("auto" if parsed.scheme == "gs" else None),
        access_key_id=key_id, secret_access_key=(sec.get("secret_key") or "").strip() or None,
        session_token=(sec.get("access_token") or "").strip() or None,
        anonymous=not key_id, addressing_style=style, verify=verify, is_gcs=parsed.scheme == "gs")


# -- 4. GCS ------------------------------------------------------------------------------

def _gcs_endpoint(env: Mapping[str, str]) -> str:
    return env.get("MODELSHELF_GCS_ENDPOINT") or GCS_ENDPOINT


def _from_gcs_env(env: Mapping[str, str]) -> S3Settings:
    key_id = _env(env, "GCS_HMAC_ACCESS_KEY_ID", "GCS_ACCESS_KEY_ID")
    secret = _env(env, "GCS_HMAC_SECRET", "GCS_HMAC_SECRET_ACCESS_KEY", "GCS_SECRET_ACCESS_KEY")
    if bool(key_id) != bool(secret):
        raise AccessDenied("GCS HMAC credentials are incomplete: set both GCS_HMAC_ACCESS_KEY_ID and GCS_HMAC_SECRET")
    return S3Settings(source="gcs-hmac-env" if key_id else "gcs-anonymous", endpoint_url=_gcs_endpoint(env),
                      region="auto", access_key_id=key_id, secret_access_key=secret,
                      anonymous=not key_id, addressing_style="path", is_gcs=True)


# -- 5. AWS default chain ----------------------------------------------------------------

def _from_aws_env(env: Mapping[str, str]) -> S3Settings:
    endpoint = _env(env, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if not endpoint and env.get("S3_ENDPOINT"):  # KServe's storage-initializer convention
        endpoint = env["S3_ENDPOINT"]
        if "://" not in endpoint:
            endpoint = ("https://" if _bool(env.get("S3_USE_HTTPS"), True) else "http://") + endpoint
    anonymous = bool(_bool(_env(env, "AWS_NO_SIGN_REQUEST", "MODELSHELF_S3_ANONYMOUS",
                                "AWS_ANONYMOUS_CREDENTIAL"), False))
    return S3Settings(source="aws-default-chain", endpoint_url=endpoint,
                      region=_env(env, "AWS_REGION", "AWS_DEFAULT_REGION"), anonymous=anonymous,
                      profile=env.get("AWS_PROFILE") or None)


def _apply_global(s: S3Settings, env: Mapping[str, str]) -> S3Settings:
    """Environment switches that apply whatever the credential source."""
    changes: dict[str, Any] = {}
    if s.verify is True and env.get("AWS_CA_BUNDLE"):
        changes["verify"] = env["AWS_CA_BUNDLE"]
    if _bool(_env(env, "S3_VERIFY_SSL", "MODELSHELF_S3_VERIFY_SSL"), True) is False:
        changes["verify"] = False
    style = (env.get("AWS_S3_ADDRESSING_STYLE") or "").lower()
    if style in ("path", "virtual", "auto"):
        changes["addressing_style"] = style
    elif _bool(_env(env, "AWS_S3_FORCE_PATH_STYLE", "S3_FORCE_PATH_STYLE"), False):
        changes["addressing_style"] = "path"
    elif _bool(env.get("S3_USER_VIRTUAL_BUCKET"), None) is True:
        changes["addressing_style"] = "virtual"
    elif s.addressing_style == "auto" and s.endpoint_url and not _is_aws(s.endpoint_url):
        changes["addressing_style"] = "path"  # MinIO, Ceph, moto, ... rarely have wildcard DNS
    if not changes:
        return s
    return replace(s, **changes)


def _is_aws(endpoint: str) -> bool:
    return bool(re.search(r"(^|[/.])amazonaws\.com(\.cn)?(:\d+)?/?$", endpoint))
