"""Trackers (logger=csv|mlflow|wandb, combined as a list): tied to the run directory both ways, continued on resume,
tested against a real MLflow server (started and stopped here), W&B offline files and CSV columns."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from segvoc.config import REPO_ROOT, compose
from segvoc.engine.builders import logger_nodes
from segvoc.errors import ConfigError, TrackerError
from segvoc.runs.trackers import check_trackers
from segvoc.train import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_logger_choices_compose_alone_and_as_a_list():
    assert list(logger_nodes(compose([]))) == ["tensorboard"]  # the default
    both = compose(["logger=[tensorboard,mlflow]", "logger.log_checkpoints=best"])
    assert list(logger_nodes(both)) == ["tensorboard", "mlflow"]  # log_checkpoints is a setting, not a logger
    assert both.logger.log_checkpoints == "best"
    assert list(logger_nodes(compose(["logger=[csv,wandb]"]))) == ["csv", "wandb"]
    assert list(logger_nodes(compose(["logger=none"]))) == []


def test_unreachable_http_tracking_uri_and_bad_checkpoint_choice_are_refused():
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(TrackerError, match=re.escape(f"logger.mlflow.tracking_uri={uri}: no MLflow server")):
        check_trackers(compose(["logger=mlflow", f"logger.mlflow.tracking_uri={uri}"]))
    with pytest.raises(ConfigError, match="logger.log_checkpoints=some"):
        check_trackers(compose(["logger=mlflow", "logger.log_checkpoints=some"]))
    check_trackers(compose(["logger=mlflow", "logger.mlflow.tracking_uri=sqlite:////tmp/x.db"]))  # not checked


def test_continued_mlflow_run_logs_no_step_twice_and_keeps_its_params(tmp_path):
    """The counterpart of TensorBoard's purge_step: a launch continuing an MLflow run (run_id from tracker.json)
    skips points at steps the run holds, and does not re-log parameters a resumed config states differently
    (MLflow refuses to change a parameter)."""
    from mlflow import MlflowClient

    from segvoc.engine.trackers import ResumableMLFlowLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    kw = {"tracking_uri": uri, "experiment_name": "e", "artifact_location": str(tmp_path / "art")}
    first = ResumableMLFlowLogger(**kw)
    first.log_hyperparams({"cfg": {"seed": 1, "ckpt_path": None}})
    for step in (0, 1, 2, 3):  # the killed launch got to step 3; its last checkpoint was at step 1
        first.log_metrics({"train/loss": 10.0 - step}, step=step)
    again = ResumableMLFlowLogger(**kw, run_id=first.run_id)
    again.log_hyperparams({"cfg": {"seed": 1, "ckpt_path": "last.ckpt"}, "extra": 5})
    for step in (2, 3, 4):
        again.log_metrics({"train/loss": 20.0 - step, "val/miou": 0.5}, step=step)
    client = MlflowClient(uri)
    history = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss")]
    assert sorted(history) == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 7.0), (4, 16.0)]
    assert [m.step for m in client.get_metric_history(first.run_id, "val/miou")] == [2, 3, 4]  # new key: all
    params = client.get_run(first.run_id).data.params
    assert params["cfg/ckpt_path"] == "None" and params["extra"] == "5"
    assert len(client.search_runs([first.experiment_id])) == 1


def test_csv_logger_columns(smoke_cfg, tmp_path):
    metrics = train(smoke_cfg("logger=csv", "trainer.max_epochs=2", "data.subset=5", "data.num_workers=1"))
    import csv

    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    columns = set(rows[0])
    assert {"epoch", "step", "train/loss_step", "train/loss_epoch", "val/loss", "val/miou", "val/pixel_acc",
            "val/mean_class_acc", "val_iou/background", "lr-Adam", "test/miou", "test_iou/background",
            "best_val/miou"} <= columns
    val = [float(r["val/miou"]) for r in rows if r["val/miou"]]
    assert len(val) == 2  # one point per epoch
    (final,) = [r for r in rows if r["test/miou"]]
    assert float(final["test/miou"]) == pytest.approx(metrics["test"]["miou"])
    assert float(final["best_val/miou"]) == pytest.approx(metrics["val"]["miou"])
    assert not (tmp_path / "tracker.json").exists()  # no tracker run to record


@pytest.mark.slow
def test_wandb_without_api_key_runs_offline_into_the_run_directory(smoke_cfg, tmp_path, monkeypatch, capsys):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a W&B key
    metrics = train(smoke_cfg("logger=[tensorboard,wandb]", "trainer.max_epochs=2", "data.subset=5",
                              "logger.log_checkpoints=best"))
    info = json.loads((tmp_path / "tracker.json").read_text())["wandb"]
    assert info["mode"] == "offline" and info["url"] is None
    run_dir = Path(info["dir"])
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    assert f"wandb sync {run_dir}" in capsys.readouterr().out  # says where the files went
    files = run_dir / "files"
    for name in ("MODEL_CARD.md", "metrics.json", "tracker.json", "checkpoints/best.ckpt"):
        assert (files / name).exists(), name
    deadline = time.monotonic() + 120  # W&B's service process may still be writing after finish() returned
    while True:
        records = _wandb_records(next(run_dir.glob("run-*.wandb")))  # what `wandb sync` would upload
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(1)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == info["id"] and f"seed:{42}" in run.tags and run.run_group == run.tags[0].split(":")[1]
    assert str(tmp_path) in run.config.SerializeToString().decode(errors="replace")  # run_dir, in its config
    saved = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert {"MODEL_CARD.md", "metrics.json", "tracker.json", "checkpoints/best.ckpt"} <= saved
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert len([h for h in history if "val/miou" in h]) == 2  # one point per epoch
    (final,) = [h for h in history if "test/miou" in h]
    assert final["test/miou"] == pytest.approx(metrics["test"]["miou"])
    assert final["best_val/miou"] == pytest.approx(metrics["val"]["miou"])
    assert f"W&B run `{info['id']}`" in (tmp_path / "MODEL_CARD.md").read_text()


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (``run-<id>.wandb``: a 7-byte header, then LevelDB-log blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


# ---------------------------------------------------------------------------------------------------------------
# A real MLflow tracking server

def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 (free port, SQLite backend), started here and stopped at the end."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts")]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5):
                    break
            except OSError:
                assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not answer in 180 s"
                time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="real signals and a server process: Linux")
def test_mlflow_server_two_seed_sweep_killed_and_resumed(mlflow_server, tmp_path, synthetic_root):
    """A 2-seed multirun logging to a real server; job 1 gets SIGTERM mid-epoch and the same command resumes it.
    There are still exactly 2 MLflow runs, tagged and tied to their run directories both ways, with the final
    test mIoU of each metrics.json, the artifacts, and one val/miou point per epoch in the resumed run."""
    from mlflow import MlflowClient

    sweep = ["segvoc.train", "-m", "seed=1,2", "data=synthetic", "data.synthetic=null", f"data.root={synthetic_root}",
             "debug=smoke", "trainer.max_epochs=2", "data.subset=5", "data.batch_size=2", "data.num_workers=0",
             "trainer.enable_progress_bar=false", "logger=[tensorboard,mlflow]",
             f"logger.mlflow.tracking_uri={mlflow_server}", "logger.log_checkpoints=best",
             f"hydra.sweep.dir={tmp_path}/sw", f"paths.output_root={tmp_path}/out"]
    kill = ["+callbacks.signal_at._target_=tests.helpers.SignalAt", "+callbacks.signal_at.step=4",
            "+callbacks.signal_at.sig=15", "+callbacks.signal_at.job=1"]
    first = _cli(*sweep, *kill)
    assert first.returncode == 2 and "stopped by SIGTERM" in first.stderr, first.stderr[-3000:]
    job0, job1 = _jobs(tmp_path / "sw")
    assert not (job1 / "metrics.json").exists() and (job1 / "tracker.json").is_file()
    again = _cli(*sweep, *kill)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the unfinished run" in again.stdout + again.stderr

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sw")  # named after the sweep (its directory)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # the resumed job continued its run instead of opening another
    by_dir = {r.data.tags["run_dir"]: r for r in runs}
    assert set(by_dir) == {str(job0), str(job1)}
    assert len({r.data.tags["seed_group"] for r in runs}) == 1  # the config minus seed is the same
    assert {r.data.tags["seed"] for r in runs} == {"1", "2"}
    for job in (job0, job1):
        run = by_dir[str(job)]
        assert run.info.status == "FINISHED"
        assert json.loads((job / "tracker.json").read_text())["mlflow"]["run_id"] == run.info.run_id
        assert run.info.run_id in (job / "MODEL_CARD.md").read_text()
        metrics = json.loads((job / "metrics.json").read_text())
        assert run.data.metrics["test/miou"] == pytest.approx(metrics["test"]["miou"])
        assert run.data.metrics["best_val/miou"] == pytest.approx(metrics["val"]["miou"])
        assert run.data.params["cfg/seed"] == run.data.tags["seed"]  # the composed config, flattened
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"MODEL_CARD.md", "metrics.json", "tracker.json", "checkpoints", "figures"} <= names
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
        history = client.get_metric_history(run.info.run_id, "val/miou")
        assert len(history) == 2, [(m.step, m.value) for m in history]  # one point per epoch, also when resumed
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step")]
        assert len(steps) == len(set(steps))  # no step logged twice


@pytest.mark.slow
def test_mlflow_server_that_is_down_is_one_line_before_training(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    r = _cli("segvoc.train", "logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri={uri}", "debug=smoke",
             "data=synthetic", f"hydra.run.dir={tmp_path}/run", f"paths.output_root={tmp_path}/out", timeout=300)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and uri in lines[0], r.stderr[-2000:]
    assert "mlflow server" in lines[0] and "Traceback" not in r.stderr
    assert not any((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
