"""Leases and write-once files on a local folder, NFS, s3:// and gs://: one builder per key.

Everything rests on one primitive, an atomic create-if-absent (`Creator.create`):
  local disk, NFS  link() of a fully written temporary file: atomic on the NFS server in every
                   NFS version (O_EXCL is only from NFSv3 on); a retransmitted link whose reply
                   was lost reads as EEXIST, so the temporary's link count decides.
  s3://            PutObject with If-None-Match: * (boto3; S3 has honoured it since 2024-08).
                   An S3-compatible store that ignores it is refused, not trusted (`_probe`).
  gs://            an upload with if_generation_match=0 (google-cloud-storage).
Other stores have none, and artifacts there are refused with one line.

A lease on `key` is a chain of files `<key>.lease.0`, `.1`, ...: the last one is the lease.
Taking a free or expired lease means creating the next file of the chain, so of any number of
claimants exactly one wins, whatever their clocks and caches. Only the holder rewrites its own
file, to renew it. A holder counts its lease as held for 3/4 of its length after the last
renewal that went through; a claimant takes it over only after all of it. A holder that could
not renew in time, or that finds a successor in the chain, has lost the lease (`LeaseLost`).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time
import uuid
from urllib.parse import parse_qs, urlparse

from raysd.errors import ConfigError
from raysd.storage import Store

RECORD_BYTES = 256  # a local lease file is rewritten in place, padded to this size


class LeaseLost(RuntimeError):
    """This builder no longer holds the lease on a key: another may be building it."""


class Creator:
    """Atomic create-if-absent of a whole file on one store."""

    def create(self, path: str, data: bytes) -> bool:
        """Write `data` at `path` unless something is there: True when this call created it."""
        raise NotImplementedError


class LocalCreator(Creator):
    def create(self, path: str, data: bytes) -> bool:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return os.stat(tmp).st_nlink == 2  # our link went through; its reply was lost
        finally:
            os.unlink(tmp)


class S3Creator(Creator):
    def __init__(self, uri: str):
        import boto3

        # The store pyarrow reaches from the same URI: its endpoint, region and keys, if given.
        query = {k: v[-1] for k, v in parse_qs(urlparse(uri).query).items()}
        endpoint = query.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=query.get("region"),
                                   aws_access_key_id=query.get("access_key"),
                                   aws_secret_access_key=query.get("secret_key"),
                                   aws_session_token=query.get("session_token"))
        put = self.client.meta.service_model.operation_model("PutObject").input_shape.members
        if "IfNoneMatch" not in put:
            raise ConfigError(f"artifacts {uri}: boto3 {boto3.__version__} predates S3's conditional "
                              "writes (If-None-Match); pip install -U boto3")

    def create(self, path: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        bucket, name = path.split("/", 1)
        try:
            self.client.put_object(Bucket=bucket, Key=name, Body=data, IfNoneMatch="*")
            return True
        except ClientError as err:
            # 412: it exists; 409: a concurrent conditional write to the same name won.
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise OSError(f"s3://{path}: {err}") from None


class GCSCreator(Creator):
    def __init__(self):
        from google.cloud import storage

        self.client = storage.Client()

    def create(self, path: str, data: bytes) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        bucket, name = path.split("/", 1)
        try:
            self.client.bucket(bucket).blob(name).upload_from_string(data, if_generation_match=0)
            return True
        except PreconditionFailed:
            return False


# scheme -> (module, package, how to install it): boto3 is a dependency of raysd, GCS's client an extra
CLIENTS = {"s3": ("boto3", "boto3", "pip install boto3"),
           "gs": ("google.cloud.storage", "google-cloud-storage", "pip install 'raysd[gcs]'")}


def require_client(uri: str) -> None:
    """A ConfigError, in one line, when the client library that creates-if-absent on `uri`'s
    store is not installed (checked before anything touches the store)."""
    scheme = urlparse(uri).scheme if "://" in uri else "file"
    module, package, install = CLIENTS.get("gs" if scheme == "gcs" else scheme, (None,) * 3)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"artifacts {uri}: one builder per artifact on {scheme}:// needs "
                          f"{package} ({install})") from None


def creator(uri: str, store: Store) -> Creator:
    """The store's create-if-absent, or a ConfigError naming what it lacks."""
    require_client(uri)
    scheme = urlparse(uri).scheme if "://" in uri else "file"
    if store.local:
        return LocalCreator()
    if scheme == "s3":
        return _probe(S3Creator(uri), store)
    if scheme in ("gs", "gcs"):
        return GCSCreator()
    raise ConfigError(f"artifacts {uri}: {scheme}:// has no atomic create-if-absent raysd knows; "
                      "use a local or NFS folder, s3:// or gs://")


def _probe(s3: S3Creator, store: Store) -> S3Creator:
    """S3-compatible stores that ignore If-None-Match would grant every lease: refuse them."""
    return s3 if _honours_if_none_match(s3, store.path("")) else _refuse(store)


_PROBED: dict[tuple, bool] = {}  # (endpoint, bucket) -> whether it honours If-None-Match


def _honours_if_none_match(s3: S3Creator, folder: str) -> bool:
    bucket = folder.split("/", 1)[0]
    cache_key = (s3.client.meta.endpoint_url, bucket)
    if cache_key not in _PROBED:
        probe = f"{folder.rstrip('/')}/.raysd-probe-{uuid.uuid4().hex}"
        first, second = s3.create(probe, b"1"), s3.create(probe, b"2")
        s3.client.delete_object(Bucket=bucket, Key=probe.split("/", 1)[1])
        _PROBED[cache_key] = first and not second
    return _PROBED[cache_key]


def _refuse(store: Store):
    raise ConfigError(f"artifacts s3://{store.root}: this S3 store ignores If-None-Match, so two "
                      "trials could both build one artifact; use a local or NFS folder instead")


@dataclasses.dataclass
class Held:
    generation: int  # our file in the chain: <key>.lease.<generation>
    valid_until: float  # this holder's view; claimants wait until the expiry written in the file
    error: str = ""  # the last renewal's failure, for the LeaseLost message


class Leases:
    """The leases of one owner on the keys under a store's root."""

    def __init__(self, store: Store, create: Creator, owner: str, seconds: float):
        self.store, self.creator, self.owner, self.seconds = store, create, owner, seconds
        self.held: dict[str, Held] = {}

    def _name(self, key: str, generation: int) -> str:
        return f"{key}.lease.{generation}"

    def _record(self, expires: float) -> bytes:
        doc = json.dumps({"owner": self.owner, "expires": expires, "nonce": uuid.uuid4().hex[:8]})
        return doc.ljust(RECORD_BYTES).encode()

    def _current(self, key: str) -> tuple[int, dict | None]:
        """The last file of the chain and its record (None: unreadable), or (-1, None)."""
        generation, record = -1, None
        while True:
            try:
                text = self.store.read_text(self._name(key, generation + 1))
            except FileNotFoundError:
                return generation, record
            generation += 1
            try:
                record = json.loads(text)
            except ValueError:  # caught mid-rewrite: treat it as held
                record = None

    def holder(self, key: str) -> str | None:
        """The owner of the unexpired lease on `key`, or None."""
        _, record = self._current(key)
        return record["owner"] if record and record["expires"] >= time.time() else None

    def acquire(self, key: str) -> bool:
        """Take the lease on `key` if it is free, expired or already ours: True when held."""
        for _ in range(100):
            generation, record = self._current(key)
            if generation >= 0 and record is None:
                return False
            if record and record["expires"] >= time.time():
                if record["owner"] != self.owner:
                    return False
                # Ours, left by this trial before a restart: keep it.
                self.held[key] = Held(generation, record["expires"] - self.seconds / 4)
                try:
                    self.renew(key)
                except LeaseLost:
                    del self.held[key]
                    return False
                return True
            started = time.time()
            if self.creator.create(self.store.path(self._name(key, generation + 1)),
                                   self._record(started + self.seconds)):
                self.held[key] = Held(generation + 1, started + self.seconds * 3 / 4)
                return True
        return False

    def renew(self, key: str) -> None:
        """Extend our lease on `key`; LeaseLost when it is no longer ours."""
        held = self.held.get(key)
        if held is None:
            raise LeaseLost(f"artifact {key}: {self.owner} holds no lease on it")
        started = time.time()
        if started > held.valid_until:
            raise LeaseLost(f"artifact {key}: the lease of {self.owner} ran out before it could be "
                            f"renewed{': ' + held.error if held.error else ''}")
        try:
            self._rewrite(key, held.generation, started + self.seconds)
        except OSError as err:
            held.error = str(err).splitlines()[0]
            raise
        if self.store.exists(self._name(key, held.generation + 1)):
            raise LeaseLost(f"artifact {key}: another trial took over the lease of {self.owner}")
        held.valid_until, held.error = started + self.seconds * 3 / 4, ""

    def _rewrite(self, key: str, generation: int, expires: float) -> None:
        if self.store.local:  # in place: the same file stays, so NFS readers see the new bytes
            fd = os.open(self.store.path(self._name(key, generation)), os.O_WRONLY)
            try:
                os.pwrite(fd, self._record(expires), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            self.store.write_bytes(self._record(expires), self._name(key, generation))

    def release(self, key: str, published: bool) -> None:
        """Give the lease on `key` up: the chain is deleted once the artifact is published (no
        one needs it then), else our file is marked expired so a waiter takes over at once."""
        held = self.held.pop(key, None)
        if held is None:
            return
        if not published:
            if time.time() > held.valid_until or self.store.exists(self._name(key, held.generation + 1)):
                return  # no longer ours to give up
            try:
                self._rewrite(key, held.generation, 0.0)
            except OSError as err:  # then it runs out on its own
                warn(f"artifact {key}: giving the lease up failed ({err})")
            return
        for generation in range(held.generation + 1):
            try:
                self.store.delete(self._name(key, generation))
            except FileNotFoundError:
                pass


def warn(message: str) -> None:
    print(f"raysd: {message}", file=sys.stderr, flush=True)
