"""A real `ray job submit` against a two-node `ray start` cluster with token auth, and S3 storage
against a local moto server; both servers are the session's (conftest.py), ended by their marker
when it ends. Every process started here is ended here, by its marker."""
import json
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from helpers import BIN, TINY, run_ok


def test_ray_job_submit_to_a_two_node_cluster_with_token_auth(two_nodes, demo_smoke_job):
    """The session's two-node cluster and the demo's --smoke study submitted to it
    (conftest.demo_smoke_job; test_smoke checks the study itself)."""
    env, address = two_nodes["env"], two_nodes["dashboard"]

    # token auth is on: a wrong token is turned away
    wrong = subprocess.run([BIN / "ray", "job", "list", "--address", address],
                           env={**env, "RAY_AUTH_TOKEN": "0" * 32}, capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode != 0

    job, study, elapsed = demo_smoke_job
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout
    rows = pq.read_table(study / "results" / "trials.parquet").to_pylist()
    # two smoke chains of the demo, each fine-tuned at T' = 0 and 1
    assert len({r["trial_id"] for r in rows}) == 2 and len(rows) == 4
    assert {r["status"] for r in rows} == {"completed"}
    nodes = json.loads(run_ok([BIN / "ray", "list", "nodes", "--address", address, "--format", "json"],
                            env).stdout)
    assert len([n for n in nodes if n["state"] == "ALIVE"]) == 2
    print(f"ray job submit -> finished study: {elapsed:.0f} s")


def test_study_on_s3_storage(moto_s3, marked_env, tmp_path):
    """Results, TensorBoard and checkpoints on s3:// (the session's moto server); TensorBoard
    events are uploaded while the trial runs, not only when it ends, from a local staging
    folder that is gone when the command returns."""
    # TMPDIR: where the driver stages TensorBoard events (Ray's own files follow RAY_TMPDIR).
    env = {**marked_env, **moto_s3, "RAYSD_HISTORY_PART_SECONDS": "2", "TMPDIR": str(tmp_path)}
    s3 = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing",
                           secret_key="testing", region="us-east-1")
    run = subprocess.Popen(
        [sys.executable, "-m", "raysd.cli", "run", "--space", "demo", *TINY,
         "--set", "logging.keep_checkpoints=true",  # deleted by default once the trial ends
         "--set", "finetune.steps=16",  # a trial long enough to be seen running
         "--storage", "s3://raysd/studies", "--name", "s3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen_running = False
    while run.poll() is None and not seen_running:
        listed = [i.path for i in s3.get_file_info(pafs.FileSelector("raysd/studies/s3", recursive=True,
                                                                     allow_not_found=True))]
        trial_events = [p for p in listed if "/tensorboard/" in p and p.count("/") > 4 and "tfevents" in p]
        done = any(p.endswith("results/trials.parquet") for p in listed)
        if trial_events and not done:
            with s3.open_input_stream(trial_events[0]) as f:
                seen_running = len(f.read()) > 200  # more than the file header: scalars
        time.sleep(1)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-3000:]
    assert seen_running, "no trial's TensorBoard events on S3 before the trial ended"
    rows = pq.read_table("raysd/studies/s3/results/trials.parquet", filesystem=s3).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "completed"
    history = pq.read_table("raysd/studies/s3/results/history", filesystem=s3)
    assert history.num_rows > 0
    listed = [info.path for info in s3.get_file_info(pafs.FileSelector("raysd/studies/s3", recursive=True))]
    assert any("/tensorboard/" in p and "tfevents" in p for p in listed)
    assert any("/train/" in p and p.endswith("state.pt") for p in listed)  # kept, as asked
    assert any(p.endswith("space.yaml") for p in listed)
    assert not list(tmp_path.glob("raysd-tb-*"))
