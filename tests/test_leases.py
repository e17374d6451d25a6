"""One builder per artifact key, on local disk and on S3 (a moto server behind a loopback proxy
that delays uploads); no Ray: threads claim the same key."""
import contextlib
import re
import socket
import sys
import threading
import time
import uuid

import pytest
import torch

from raysd.artifacts import ArtifactStore

BUILD_SECONDS = 6.0  # longer than a slow claim under the old lease (write, settle 1 s, read back)


@contextlib.contextmanager
def proxy(endpoint: str, put_delay: float = 0.0, drop: bytes = b""):
    """A TCP proxy to `endpoint`: it holds every PUT request `put_delay` seconds before passing
    it on, as a slow or congested link to the store would, and removes header `drop` from
    requests, as a store that ignores it would. Yields the proxy's host:port."""
    host, port = endpoint.split("//")[1].split(":")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    header = re.compile(rb"(?im)^" + re.escape(drop) + rb":[^\r\n]*\r\n") if drop else None

    def pump(src, dst, requests):
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if requests and data.startswith(b"PUT "):
                    time.sleep(put_delay)
                if requests and header:
                    data = header.sub(b"", data)
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def serve():
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection((host, int(port)))
            threading.Thread(target=pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


def _claim_build_load(uri: str, owner: str, builds: list, results: dict, start) -> None:
    """What a trial does with one stage: claim it, build it (slowly) or wait, then load it."""
    store = ArtifactStore(uri, owner=owner, lease_seconds=30)
    start.wait()
    while (decision := store.claim("k")) == "wait":
        time.sleep(0.2)
    if decision == "build":
        builds.append(owner)
        with store.building("k"):
            time.sleep(BUILD_SECONDS)
            # Weights that differ by builder, as on GPUs: the meta must pair with its own.
            store.save("k", {"w": torch.full((4,), float(len(owner)))}, {"row": {"owner": owner}})
    results[owner] = store.load("k")


def _left_by_a_dead_builder(uri: str) -> None:
    dead = ArtifactStore(uri, owner="dead", lease_seconds=1.5)
    assert dead.claim("k") == "build"
    time.sleep(1.6)  # and its lease ran out


def _race(uris: dict[str, str]) -> tuple[list, dict]:
    builds, results, start = [], {}, threading.Barrier(len(uris))
    threads = [threading.Thread(target=_claim_build_load, args=(uri, owner, builds, results, start))
               for owner, uri in uris.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(results) == set(uris), "a claimant failed (see its traceback above)"
    return builds, results


def _one_build_one_artifact(builds: list, results: dict) -> None:
    assert len(builds) == 1, f"built by {builds}"
    (builder,) = builds
    for weights, meta in results.values():
        assert meta["row"]["owner"] == builder
        assert torch.equal(weights["w"], torch.full((4,), float(len(builder))))


@pytest.fixture
def s3(moto_s3, monkeypatch):
    for key, value in moto_s3.items():
        monkeypatch.setenv(key, value)
    return moto_s3["AWS_ENDPOINT_URL"]


@pytest.mark.parametrize("lease", ["none", "expired"])
def test_two_claimants_on_s3_with_a_slow_upload_build_once(s3, lease):
    """Both claimants find no lease (or a dead builder's); one's uploads take longer than the
    other's whole claim: still one build, and both load the builder's weights and row."""
    prefix = f"raysd/race-{uuid.uuid4().hex[:8]}"
    if lease == "expired":
        _left_by_a_dead_builder(f"s3://{prefix}")
    with proxy(s3, put_delay=0.0) as fast, proxy(s3, put_delay=1.5) as slow:
        uris = {owner: f"s3://{prefix}?endpoint_override={address}&scheme=http"
                for owner, address in (("fast-claimant", fast), ("slow", slow))}
        _one_build_one_artifact(*_race(uris))


def test_two_claimants_on_local_disk_build_once(tmp_path):
    uri = str(tmp_path / "artifacts")
    _one_build_one_artifact(*_race({"first-claimant": uri, "second": uri}))


def test_of_many_claimants_of_an_expired_lease_one_takes_it_over(tmp_path):
    """A dead builder's lease: eight claimants see it expired at once; exactly one builds."""
    uri = str(tmp_path)
    _left_by_a_dead_builder(uri)
    stores = [ArtifactStore(uri, owner=f"claimant-{i}", lease_seconds=30) for i in range(8)]
    start, decisions = threading.Barrier(len(stores)), {}

    def claim(store):
        start.wait()
        decisions[store.owner] = store.claim("k")

    threads = [threading.Thread(target=claim, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(decisions.values()) == ["build"] + ["wait"] * 7, decisions


def test_a_builder_that_lost_its_lease_knows_it_and_publishes_nothing(tmp_path):
    """A builder stalled past its lease (a long pause, a partition) is taken over: its save
    raises LeaseLost, leaves no weights, and the new holder publishes."""
    from raysd.leases import LeaseLost

    stalled = ArtifactStore(str(tmp_path), owner="stalled", lease_seconds=0.2)
    assert stalled.claim("k") == "build"
    time.sleep(0.3)
    taker = ArtifactStore(str(tmp_path), owner="taker", lease_seconds=30)
    assert taker.claim("k") == "build"
    with pytest.raises(LeaseLost, match="artifact k: .*stalled"):
        stalled.save("k", {"w": torch.zeros(2)}, {"row": {"owner": "stalled"}})
    assert not taker.has("k") and not list((tmp_path / "k").glob("weights-*"))
    taker.save("k", {"w": torch.ones(2)}, {"row": {"owner": "taker"}})
    weights, meta = stalled.load("k")
    assert meta["row"]["owner"] == "taker" and torch.equal(weights["w"], torch.ones(2))


def test_a_builder_whose_lease_a_skewed_clock_took_over_finds_the_successor(tmp_path):
    """The holder's own clock says its lease is good, but a claimant (clock ahead) took it
    over: the holder sees the successor in the chain and does not publish."""
    import json

    from raysd.leases import LeaseLost

    holder = ArtifactStore(str(tmp_path), owner="holder", lease_seconds=60)
    assert holder.claim("k") == "build"
    (tmp_path / "k.lease.0").write_text(json.dumps({"owner": "holder", "expires": time.time() - 1}))
    assert ArtifactStore(str(tmp_path), owner="ahead").claim("k") == "build"
    with pytest.raises(LeaseLost, match="another trial took over the lease of holder"):
        holder.save("k", {"w": torch.zeros(2)}, {"row": {}})
    assert not holder.has("k")


def test_a_published_artifact_is_never_published_over(tmp_path):
    """meta.json is created once: a second builder (here one that took a fresh lease after the
    first published) gets LeaseLost, and the first builder's meta and weights stay."""
    from raysd.leases import LeaseLost

    first = ArtifactStore(str(tmp_path), owner="first")
    assert first.claim("k") == "build"
    first.save("k", {"w": torch.ones(2)}, {"row": {"owner": "first"}})
    first.release("k")
    late = ArtifactStore(str(tmp_path), owner="late")
    assert late.leases.acquire("k")  # past claim's look at meta.json, as a slow claimant could be
    with pytest.raises(LeaseLost, match="another trial published it first"):
        late.save("k", {"w": torch.zeros(2)}, {"row": {"owner": "late"}})
    weights, meta = late.load("k")
    assert meta["row"]["owner"] == "first" and torch.equal(weights["w"], torch.ones(2))
    assert len(list((tmp_path / "k").glob("weights-*"))) == 1


def test_renewals_that_keep_failing_end_in_lease_lost(tmp_path, monkeypatch, capsys):
    """Storage errors while renewing are reported, and once the lease has run out the builder
    is told it lost it: it does not publish a key a waiter may be building."""
    from raysd.leases import LeaseLost

    store = ArtifactStore(str(tmp_path), owner="a", lease_seconds=0.4)
    assert store.claim("k") == "build"

    def unreachable(*args):
        raise OSError("store unreachable")

    monkeypatch.setattr(store.leases, "_rewrite", unreachable)
    with pytest.raises(LeaseLost, match="ran out.*store unreachable"):
        with store.building("k"):
            time.sleep(0.5)
            store.save("k", {"w": torch.ones(2)}, {"row": {}})
    assert not store.has("k") and "renewing the lease failed (store unreachable)" in capsys.readouterr().err


def test_a_load_checks_the_weights_against_the_hash_in_meta(tmp_path):
    import json

    from raysd.artifacts import ArtifactError

    store = ArtifactStore(str(tmp_path), owner="a")
    assert store.claim("k") == "build"
    store.save("k", {"w": torch.ones(2)}, {"row": {}})
    store.release("k")
    meta = json.loads((tmp_path / "k" / "meta.json").read_text())
    torch.save({"w": torch.zeros(2)}, tmp_path / "k" / meta["weights"])  # another builder's bytes
    with pytest.raises(ArtifactError, match=r"artifact k in .*: weights-\w+\.pt is not the state"):
        store.load("k")
    (tmp_path / "k" / "meta.json").write_text(json.dumps({"row": {}}))  # an older raysd's meta
    with pytest.raises(ArtifactError, match="artifact k in .*records no weights hash"):
        store.load("k")


def test_a_store_whose_client_library_is_absent_is_refused_in_one_line(monkeypatch):
    from raysd.errors import ConfigError

    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)
    with pytest.raises(ConfigError, match=r"^artifacts gs://b/x: .* needs google-cloud-storage "
                                          r"\(pip install 'raysd\[gcs\]'\)$"):
        ArtifactStore("gs://b/x", owner="a")
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ConfigError, match=r"needs boto3 \(pip install boto3\)$"):
        ArtifactStore("s3://raysd/x", owner="a")


def test_an_s3_store_that_ignores_if_none_match_is_refused(s3):
    """An S3-compatible store without conditional writes would grant every lease: one line."""
    from raysd.errors import ConfigError

    with proxy(s3, drop=b"If-None-Match") as ignoring:
        with pytest.raises(ConfigError, match="ignores If-None-Match, so two trials could both build"):
            ArtifactStore(f"s3://raysd/x?endpoint_override={ignoring}&scheme=http", owner="a")


def test_gcs_creates_with_a_generation_precondition(monkeypatch):
    """google-cloud-storage is not installed here: a stand-in with its API and GCS's rule (an
    upload with if_generation_match=0 fails with PreconditionFailed when the object exists)."""
    import types

    from raysd.leases import GCSCreator

    class PreconditionFailed(Exception):
        pass

    objects = {}

    class Blob:
        def __init__(self, name):
            self.name = name

        def upload_from_string(self, data, if_generation_match=None):
            if if_generation_match == 0 and self.name in objects:
                raise PreconditionFailed(self.name)
            objects[self.name] = data

    client = types.SimpleNamespace(bucket=lambda b: types.SimpleNamespace(blob=lambda n: Blob(f"{b}/{n}")))
    storage = types.SimpleNamespace(Client=lambda: client)
    google = types.ModuleType("google")
    google.cloud = types.SimpleNamespace(storage=storage)
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.cloud", google.cloud)
    monkeypatch.setitem(sys.modules, "google.cloud.storage", storage)
    monkeypatch.setitem(sys.modules, "google.api_core.exceptions",
                        types.SimpleNamespace(PreconditionFailed=PreconditionFailed))
    gcs = GCSCreator()
    assert gcs.create("b/k.lease.0", b"first") and not gcs.create("b/k.lease.0", b"second")
    assert objects == {"b/k.lease.0": b"first"}
