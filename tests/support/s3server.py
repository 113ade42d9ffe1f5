"""moto's real S3 HTTP endpoint on 127.0.0.1 for tests.

    with S3Server() as s3:
        s3.create_bucket("models")
        s3.put("models", "iris/model.joblib", b"...")
        s3.endpoint_url        # http://127.0.0.1:<port>
        s3.client()            # boto3 S3 client with the fixed fake credentials
        s3.env()               # AWS_* variables for a subprocess (or monkeypatch.setenv)

Or as a pytest fixture, imported into a conftest.py:  ``from tests.support.s3server import s3_server, s3_server_session``
(session-scoped server; each test gets it reset to empty).

Notes:
- moto keeps every object in memory (mind RSS with large objects) and its state is global to
  the process: two servers in one process share buckets. ``reset()`` empties everything.
- By default moto accepts any credentials. ``with s3.iam_auth() as (key_id, secret):`` turns on
  moto's IAM check (process-global) with a freshly created user that may do anything; other
  keys then get InvalidAccessKeyId / SignatureDoesNotMatch. Anonymous (unsigned) GETs of
  objects are checked against the bucket policy / object ACL even without it
  (``create_bucket(name, public=True)`` makes objects anonymously readable).
"""
from __future__ import annotations

import contextlib
import json
import logging
import urllib.request
from typing import Any, Iterator

import pytest

ACCESS_KEY_ID = "AKIAMODELSHELFTEST01"
SECRET_ACCESS_KEY = "modelshelf-test-secret-key-0000000000000"
REGION = "us-east-1"


class S3Server:
    def __init__(self) -> None:
        self._server: Any = None
        self._client: Any = None
        self.endpoint_url = ""

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        for name in ("werkzeug", "moto"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
            self._client = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients and environment ---------------------------------------------------------
    def client(self, access_key_id: str = ACCESS_KEY_ID, secret_access_key: str = SECRET_ACCESS_KEY,
               **kwargs: Any) -> Any:
        """A boto3 S3 client (the default one is made once and reused: clients are thread-safe)."""
        import boto3
        from botocore.config import Config

        default = access_key_id == ACCESS_KEY_ID and secret_access_key == SECRET_ACCESS_KEY and not kwargs
        if default and self._client is not None:
            return self._client
        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}), **kwargs)
        if default:
            self._client = client
        return client

    def env(self) -> dict[str, str]:
        """AWS_* variables that point the default credential chain at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    # -- content -------------------------------------------------------------------------
    def create_bucket(self, name: str, public: bool = False) -> None:
        c = self.client()
        c.create_bucket(Bucket=name)
        if public:
            # s3:HeadObject is not an AWS action (HEAD needs s3:GetObject) but moto checks it by that name
            policy = {"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}
            c.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def put_large(self, bucket: str, key: str, data: bytes, part_size: int = 8 * 2**20) -> str:
        """Upload with a real multipart upload (ETag of the form "<md5>-<parts>"); returns the ETag."""
        c = self.client()
        up = c.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        parts = []
        for n, off in enumerate(range(0, len(data), part_size), start=1):
            r = c.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=n, Body=data[off:off + part_size])
            parts.append({"PartNumber": n, "ETag": r["ETag"]})
        r = c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up, MultipartUpload={"Parts": parts})
        return r["ETag"]

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        self._post("/moto-api/reset", b"")

    @contextlib.contextmanager
    def iam_auth(self) -> Iterator[tuple[str, str]]:
        """Enforce moto's IAM signature/permission checks; yields a valid (key_id, secret)."""
        import boto3

        iam = boto3.session.Session().client(
            "iam", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY)
        user = "modelshelf-test"
        with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
            iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        previous = json.loads(self._post("/moto-api/reset-auth", b"0"))["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
        try:
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            self._post("/moto-api/reset-auth", str(previous).encode())

    def _post(self, path: str, data: bytes) -> bytes:
        req = urllib.request.Request(self.endpoint_url + path, data=data, method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()


@pytest.fixture(scope="session")
def s3_server_session() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_server(s3_server_session: S3Server) -> Iterator[S3Server]:
    """A running moto S3 server, empty at the start of each test."""
    s3_server_session.reset()
    yield s3_server_session
