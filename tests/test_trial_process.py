"""A trial's processes that do not train (its Tune driver, Ray Train's controller) load no torch:
what Ray ships them, unpickled in a fresh interpreter, imports none (issue 22: ~480 MB and ~2 s
per process and trial)."""
import subprocess
import sys

LOADS = """
import sys
import ray.cloudpickle as pickle
trial_driver, backend, loop = pickle.loads(sys.stdin.buffer.read())
assert backend.backend_cls.share_cuda_visible_devices
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "timm")))
"""
DUMPS = """
import sys
import ray.cloudpickle as pickle
from raysd.ddp import DDP, train_loop
from raysd.trial import trial_driver
assert "torch" not in sys.modules  # the Tune driver process (study.py) imports raysd.trial too
sys.stdout.buffer.write(pickle.dumps((trial_driver, DDP(), train_loop)))
"""


def _python(code: str, stdin: bytes = b"") -> bytes:
    done = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout


def test_the_trial_driver_and_its_backend_unpickle_without_torch():
    blob = _python(DUMPS)
    assert _python(LOADS, blob).decode().strip() == "[]"

