"""Stage outputs as content-addressed artifacts, shared by the trials of a study (or of studies).

A pre-training stage's output (theta_0 of further pre-training, theta_t of round t) is fully
determined by its inputs: theta_init, D_u, every setting the schema (config.py) declares able to
change it, the number of ranks, the device, the method's code, the libraries and the previous
stage. `stage_key` hashes those; a trial whose key exists loads the output instead of training it.

Layout under the store's URI (a local folder, NFS, s3://, gs://):
    <key>/weights-<id>.pt  a builder's state_dict (loaded with weights_only=True)
    <key>/meta.json        created once, last: what the key was made of, the stage's last row,
                           seconds, and the name and state_hash of the weights it describes
    <key>.lease.<n>        who is building it and until when (leases.py); renewed while
                           building, so a lease left by a crashed trial expires and another
                           trial takes over
Two builders of one key need not write identical weights (GPU kernels are not bitwise
deterministic), so one builder per key is enforced (leases.py) and meta.json is published once,
naming the weights it hashed: a load that finds other bytes raises ArtifactError, naming the
key, rather than rebuild, since a published meta is never replaced.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from raysd import leases
from raysd.storage import Store

# The code that computes a stage's output: its hash (comments and docstrings aside) is part of
# every key, so a change to the method never reuses what was built before it.
METHOD_CODE = ("stages", "objectives", "regularisers", "losses", "teacher", "features", "recipe",
               "bootstrap", "models", "data")
LIBRARIES = ("torch", "timm", "transformers", "tokenizers")
LEASE_SECONDS = float(os.environ.get("RAYSD_LEASE_SECONDS", "120"))
META, WEIGHTS = "meta.json", "weights.pt"
# The layout under a key; part of every key, so artifacts of an older layout (a meta.json without
# its weights' name and hash) are never found, and are rebuilt instead of failing the load.
LAYOUT = 2


def digest(doc: dict) -> str:
    """A short, stable hash of a JSON-able description."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state_dict: names, dtypes, shapes and bytes of every tensor."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


@functools.cache
def code_version() -> str:
    """A hash of the method's code as Python reads it, from the files the running modules were
    imported from: editing a comment or a docstring keeps it, editing a statement changes it."""
    h = hashlib.sha256()
    for name in METHOD_CODE:
        module = importlib.import_module(f"raysd.{name}")
        paths = getattr(module, "__path__", None)
        files = sorted(Path(paths[0]).glob("*.py")) if paths else [Path(module.__file__)]
        for file in files:
            h.update(f"{name}/{file.name}".encode())
            h.update(_statements(file.read_text()).encode())
    return h.hexdigest()[:16]


def _statements(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


@functools.cache
def library_versions() -> dict[str, str]:
    """The versions of the libraries whose kernels and defaults shape a stage's output."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


class ArtifactError(RuntimeError):
    """A published artifact that cannot be trusted: its weights are not the ones its meta hashed."""


class ArtifactStore:
    """Stage outputs under one URI. `owner` names the builder (a trial) in its leases."""

    def __init__(self, uri: str, owner: str, lease_seconds: float = LEASE_SECONDS):
        self.uri = uri.rstrip("/")
        leases.require_client(self.uri)
        self.store = Store(self.uri)
        self.owner, self.lease_seconds = owner, lease_seconds
        self.creator = leases.creator(self.uri, self.store)
        self.leases = leases.Leases(self.store, self.creator, owner, lease_seconds)

    def has(self, key: str) -> bool:
        return self.store.exists(key, META)

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(weights, meta) of a published artifact, its weights checked against meta's hash."""
        meta = json.loads(self.store.read_text(key, META))
        if "weights_hash" not in meta:
            raise ArtifactError(f"artifact {key} in {self.uri}: its {META} records no weights hash "
                                f"(an older raysd wrote it); delete {key}/ to rebuild it")
        weights = torch.load(io.BytesIO(self.store.read_bytes(key, meta["weights"])),
                             map_location="cpu", weights_only=True)
        if state_hash(weights) != meta["weights_hash"]:
            raise ArtifactError(f"artifact {key} in {self.uri}: {meta['weights']} is not the "
                                f"state its {META} describes; delete {key}/ to rebuild it")
        return weights, meta

    def save(self, key: str, weights: dict[str, torch.Tensor], meta: dict) -> None:
        """Publish `key`: weights under a name of their own, then meta.json, created once, with
        their name and hash. Only the lease holder publishes (LeaseLost otherwise), and a meta
        never names another builder's weights, whoever publishes."""
        buffer = io.BytesIO()
        torch.save(weights, buffer)
        name = f"weights-{uuid.uuid4().hex[:12]}.pt"
        self.store.write_bytes(buffer.getvalue(), key, name)
        doc = {**meta, "weights": name, "weights_hash": state_hash(weights)}
        try:
            self.leases.renew(key)
            if not self.creator.create(self.store.path(key, META),
                                       json.dumps(doc, indent=1, default=str).encode()):
                raise leases.LeaseLost(f"artifact {key}: another trial published it first")
        except leases.LeaseLost:
            self.store.delete(key, name)
            raise

    # Leases: at most one builder per key at a time, across processes and nodes (leases.py).

    def claim(self, key: str) -> str:
        """"ready" (load it), "build" (this owner holds the lease) or "wait" (another does)."""
        if self.has(key):
            return "ready"
        if not self.leases.acquire(key):
            return "wait"
        if self.has(key):  # published by another between our first look and the lease
            self.release(key)
            return "ready"
        return "build"

    def lease_holder(self, key: str) -> str | None:
        """The owner of an unexpired lease on `key`, or None."""
        return self.leases.holder(key)

    def release(self, key: str) -> None:
        self.leases.release(key, published=self.has(key))

    @contextmanager
    def building(self, key: str):
        """Hold the lease on `key` (taken by `claim`) while the body builds it, renewed in the
        background so it stays while this process lives and expires soon after it dies. A lost
        lease is reported at once and raised by `save` (or here): it never passes silently."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_seconds / 4):
                try:
                    self.leases.renew(key)
                except leases.LeaseLost as err:
                    leases.warn(f"{err}; this trial will not publish it")
                    return
                except OSError as err:  # a storage hiccup: retried until the lease runs out
                    leases.warn(f"artifact {key}: renewing the lease failed ({err}); retrying")

        thread = threading.Thread(target=renew, name=f"raysd-lease-{key[:8]}", daemon=True)
        thread.start()
        try:
            yield
            if not self.has(key):
                self.leases.renew(key)  # built but not published: say so if the lease was lost
        finally:
            stop.set()
            thread.join()
            self.release(key)
