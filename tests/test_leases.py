"""One builder per artifact key, on local disk and on S3 (a moto server behind a loopback proxy
that delays uploads); no Ray: threads claim the same key."""
import contextlib
import socket
import threading
import time
import uuid

import pytest
import torch

from raysd.artifacts import ArtifactStore

BUILD_SECONDS = 6.0  # longer than a slow claim under the old lease (write, settle 1 s, read back)


@contextlib.contextmanager
def slow_uploads(endpoint: str, delay: float):
    """A TCP proxy to `endpoint` that holds every PUT request `delay` seconds before passing
    it on, as a slow or congested link to the store would: the proxy's host:port."""
    host, port = endpoint.split("//")[1].split(":")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def pump(src, dst, delay_puts):
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if delay_puts and data.startswith(b"PUT "):
                    time.sleep(delay)
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


def test_two_claimants_on_s3_with_a_slow_upload_build_once(s3):
    """Both claimants find no lease; one's uploads take longer than the other's whole claim:
    still one build, and both load the builder's weights with the builder's row."""
    prefix = f"raysd/race-{uuid.uuid4().hex[:8]}"
    with slow_uploads(s3, delay=0.0) as fast, slow_uploads(s3, delay=1.5) as slow:
        uris = {owner: f"s3://{prefix}?endpoint_override={proxy}&scheme=http"
                for owner, proxy in (("fast-claimant", fast), ("slow", slow))}
        _one_build_one_artifact(*_race(uris))


def test_two_claimants_on_local_disk_build_once(tmp_path):
    uri = str(tmp_path / "artifacts")
    _one_build_one_artifact(*_race({"first-claimant": uri, "second": uri}))
