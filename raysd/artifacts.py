"""Stage outputs as content-addressed artifacts, shared by the trials of a study (or of studies).

A pre-training stage's output (theta_0 of further pre-training, theta_t of round t) is fully
determined by its inputs: theta_init, D_u, every setting the schema (config.py) declares able to
change it, the number of ranks, the device, the method's code, the libraries and the previous
stage. `stage_key` hashes those; a trial whose key exists loads the output instead of training it.

Layout under the store's URI (a local folder, NFS, s3://, gs://):
    <key>/weights.pt    the stage's state_dict (loaded with weights_only=True)
    <key>/meta.json     written last: what the key was made of, the stage's last row, seconds
    <key>.lease         who is building it and until when; renewed while building, so a lease
                        left by a crashed trial expires and another trial takes over
Correctness never depends on the lease: two builders of one key write identical weights.
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
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from raysd.storage import Store

# The code that computes a stage's output: its hash (comments and docstrings aside) is part of
# every key, so a change to the method never reuses what was built before it.
METHOD_CODE = ("stages", "losses", "teacher", "features", "recipe", "bootstrap", "models", "data")
LIBRARIES = ("torch", "timm", "transformers", "tokenizers")
LEASE_SECONDS = float(os.environ.get("RAYSD_LEASE_SECONDS", "120"))
META, WEIGHTS = "meta.json", "weights.pt"


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


class ArtifactStore:
    """Stage outputs under one URI. `owner` names the builder (a trial) in its leases."""

    def __init__(self, uri: str, owner: str, lease_seconds: float = LEASE_SECONDS):
        self.uri = uri.rstrip("/")
        self.store = Store(self.uri)
        self.owner, self.lease_seconds = owner, lease_seconds

    def has(self, key: str) -> bool:
        return self.store.exists(key, META)

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(weights, meta) of a finished artifact."""
        meta = json.loads(self.store.read_text(key, META))
        weights = torch.load(io.BytesIO(self.store.read_bytes(key, WEIGHTS)), map_location="cpu",
                             weights_only=True)
        return weights, meta

    def save(self, key: str, weights: dict[str, torch.Tensor], meta: dict) -> None:
        """Weights first, meta last: an artifact exists once its meta does."""
        buffer = io.BytesIO()
        torch.save(weights, buffer)
        self.store.write_bytes(buffer.getvalue(), key, WEIGHTS)
        self.store.write_text(json.dumps(meta, indent=1, default=str), key, META)

    # Leases: at most one builder per key at a time, across processes and nodes.

    def claim(self, key: str) -> str:
        """"ready" (load it), "build" (this owner holds the lease) or "wait" (another does)."""
        if self.has(key):
            return "ready"
        holder = self.lease_holder(key)
        if holder is not None and holder != self.owner:
            return "wait"
        self.store.fs.create_dir(self.store.root, recursive=True)
        lease = self.store.path(f"{key}.lease")
        if holder is None and self.store.local and not os.path.exists(lease):
            # Atomic: the lease appears whole, and of two trials asking at once one gets it.
            tmp = f"{lease}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "w") as f:
                f.write(self._lease_doc())
            try:
                os.link(tmp, lease)
            except FileExistsError:
                return "wait"
            finally:
                os.unlink(tmp)
        else:
            # Ours already, or expired (its builder died): rewrite it. Two trials taking over
            # one expired lease at once may both build; they write identical weights.
            self._renew(key)
            if not self.store.local:  # no atomic create on object stores: write, settle, read back
                time.sleep(1.0)
        if self.lease_holder(key) != self.owner:
            return "wait"
        if self.has(key):  # finished by another between our first look and the lease
            self.release(key)
            return "ready"
        return "build"

    def lease_holder(self, key: str) -> str | None:
        """The owner of an unexpired lease on `key`, or None."""
        try:
            lease = json.loads(self.store.read_text(f"{key}.lease") or "{}")
        except (FileNotFoundError, OSError, ValueError):
            return None
        if not lease or lease.get("expires", 0) < time.time():
            return None
        return lease.get("owner")

    def _lease_doc(self) -> str:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.lease_seconds})

    def _renew(self, key: str) -> None:
        self.store.write_text(self._lease_doc(), f"{key}.lease")

    def release(self, key: str) -> None:
        if self.lease_holder(key) == self.owner:
            self.store.delete(f"{key}.lease")

    @contextmanager
    def building(self, key: str):
        """Hold the lease on `key` while the body builds it: renewed in the background, so it
        stays while this process lives and expires soon after it dies."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_seconds / 4):
                try:
                    self._renew(key)
                except OSError:
                    pass  # a storage hiccup: the next renewal tries again

        thread = threading.Thread(target=renew, name=f"raysd-lease-{key[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release(key)
