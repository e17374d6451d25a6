"""One study, one driver: a driver holds `<study>/driver.lock` from before it creates or resumes
the study until it returns. A second driver on the same study is refused with one line.

What it guarantees where:
- Local disk: an OS lock (flock) on the file, exact. The kernel drops it when the driver's
  process ends, however it ends, so a crashed driver never blocks `--resume`.
- NFS: the same flock, which Linux clients implement with NFS byte-range locks, so it holds
  across hosts where the mount has locking (NFSv4, or v3 with lockd; not `nolock`). The server
  frees a crashed client's lock when its lease lapses (NFSv4: about 90 s).
- Object stores (s3://, gs://), which pyarrow gives no lock: a heartbeat. The driver writes its
  host, pid and the time every RENEW_S seconds; another driver refuses while that is younger
  than STALE_S, so a crashed driver's lock is taken over STALE_S after its last renewal.
  It assumes the hosts' clocks agree within a minute, and two drivers that start within
  SETTLE_S of each other can both pass (write, settle and read back narrow that window; they
  do not close it).
Ray-free.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from raysd.errors import ConfigError
from raysd.storage import Store

LOCK_FILE = "driver.lock"
RENEW_S, STALE_S, SETTLE_S = 30.0, 120.0, 2.0


class DriverLock:
    """`with DriverLock(study_uri):` holds the study for this process; ConfigError when another
    driver holds it."""

    def __init__(self, study_uri: str):
        self.uri, self.store = study_uri, Store(study_uri)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self._fd: int | None = None
        self._created = False  # the study folder did not exist: removed again if left empty
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> DriverLock:
        if self.store.local:
            self._lock_file()
        else:
            self._heartbeat()
        return self

    def __exit__(self, *exc) -> None:
        if self.store.local:
            self._unlock_file()
        else:
            self._stop.set()
            self._renewer.join()
            if (self._read() or {}).get("token") == self.me["token"]:
                self.store.delete(LOCK_FILE)

    def _refuse(self, holder: dict | None, extra: str = "") -> None:
        who = f" (host {holder.get('host')}, pid {holder.get('pid')}{extra})" if holder else ""
        raise ConfigError(f"study {self.uri} is being run by another driver{who}: one study, one "
                          "driver")

    # ---- local disk and NFS: flock ----------------------------------------------------------

    def _lock_file(self) -> None:
        folder = Path(self.store.root)
        self._created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._remove_if_empty(folder)
                self._refuse(self._read())
            try:  # a releasing driver unlinks the file it held: lock the one at `path` now
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self.me).encode())
        self._fd = fd

    def _unlock_file(self) -> None:
        folder = Path(self.store.root)
        os.unlink(folder / LOCK_FILE)  # while still held, so no one locks a file that is gone
        os.close(self._fd)
        self._remove_if_empty(folder)

    def _remove_if_empty(self, folder: Path) -> None:
        if self._created:
            try:
                folder.rmdir()  # a study this driver never got to create leaves no folder
            except OSError:
                pass

    # ---- object stores: a heartbeat ---------------------------------------------------------

    def _read(self) -> dict | None:
        if not self.store.exists(LOCK_FILE):
            return None
        try:
            return json.loads(self.store.read_text(LOCK_FILE))
        except (FileNotFoundError, ValueError):  # released meanwhile, or not yet written
            return None

    def _write(self) -> None:
        self.store.write_text(json.dumps({**self.me, "renewed": time.time()}), LOCK_FILE)

    def _heartbeat(self) -> None:
        holder = self._read()
        if holder and time.time() - holder.get("renewed", 0) < STALE_S:
            self._refuse(holder, f", lock renewed {time.time() - holder['renewed']:.0f} s ago; a "
                                 f"driver that crashed frees it after {STALE_S:.0f} s")
        self._write()
        time.sleep(SETTLE_S)  # a driver that wrote at the same moment has written by now
        holder = self._read()
        if (holder or {}).get("token") != self.me["token"]:
            self._refuse(holder)
        self._renewer = threading.Thread(target=self._renew, name="raysd-driver-lock", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self._write()
            except OSError as err:  # said, not swallowed: another driver may take the study
                print(f"raysd: warning: cannot renew {self.uri}/{LOCK_FILE} ({err}); another "
                      f"driver may take the study after {STALE_S:.0f} s", file=sys.stderr)
