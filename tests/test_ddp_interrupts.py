"""Interrupts under DDP (``trainer=ddp_cpu trainer.devices=2``, gloo) with real signals: every rank stops after
the same batch, they save together, the run exits 2 within 60 s, and ``resume=`` ends exactly where an
uninterrupted 2-process run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segvoc.config import REPO_ROOT

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="multi-process tests are run on Linux"),
              pytest.mark.slow]

# 12 training ids, 2 ranks x batch 2: 3 steps per epoch, 6 in all; step 4 is batch 1 of epoch 1 (mid-epoch)
DDP = ["data=synthetic", "data.synthetic=null", "debug=smoke", "data.subset=12", "data.batch_size=2",
       "data.num_workers=0", "trainer=ddp_cpu", "trainer.devices=2", "trainer.enable_progress_bar=false"]
HANG_GUARD = 400  # seconds: a hung job fails the test instead of blocking the suite


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _train(root: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "segvoc.train", *DDP, f"data.root={root}", f"paths.output_root={run.parent}",
            f"hydra.run.dir={run}", *extra]


def _run_group(cmd: list[str]) -> tuple[int, str, float]:
    """Run ``cmd`` in a new session (its own process group, so a group signal reaches its ranks and not pytest);
    returns (exit code, stderr, time when the whole group was gone). Kills the group if it hangs."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"DDP run hung for {HANG_GUARD} s (killed)")
    deadline = time.time() + 60
    while time.time() < deadline:  # the other rank must be gone too, not left hanging in a collective
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("rank 0 exited but another rank of the job was still running 60 s later")
    return proc.returncode, err, time.time()


def _same_run(a: Path, b: Path) -> None:
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    sa = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)
    sb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)
    assert sa["global_step"] == sb["global_step"] == 6 and sa["epoch"] == sb["epoch"] == 1
    differing = [k for k in sa["state_dict"] if not torch.equal(sa["state_dict"][k], sb["state_dict"][k])]
    assert not differing, f"{len(differing)} of {len(sa['state_dict'])} tensors differ"


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, synthetic_root) -> Path:
    """One uninterrupted 2-process run, shared by the tests of this module."""
    run = tmp_path_factory.mktemp("ddp_ref") / "run"
    code, err, _ = _run_group(_train(synthetic_root, run, "+callbacks.seeds._target_=tests.helpers.RecordSeeds",
                                     f"+callbacks.seeds.path={run.parent / 'seeds'}"))
    assert code == 0, err[-3000:]
    return run


def test_ddp_ranks_draw_their_own_dropout_seeds(ddp_reference):
    """Dropout is seeded by (seed, epoch, batch, rank): the two ranks never share a seed."""
    rows = [line.split() for line in (ddp_reference.parent / "seeds").read_text().splitlines()]
    seeds = {(int(e), int(b), int(r)): int(s) for e, b, r, s in rows}
    assert len(seeds) == 12  # 2 epochs x 3 batches x 2 ranks
    assert len(set(seeds.values())) == 12


def test_two_uninterrupted_ddp_runs_are_identical(ddp_reference, tmp_path, synthetic_root):
    """What the interrupt tests compare against must itself be reproducible."""
    code, err, _ = _run_group(_train(synthetic_root, tmp_path / "run"))
    assert code == 0, err[-3000:]
    _same_run(tmp_path / "run", ddp_reference)


# Ctrl-C while the ranks are at different points: rank 1 is held 5 s after step 4, before its stop check, then sends
# SIGINT to the group. With a flag per rank, rank 0 has passed its check of step 4 by then (it waits in Lightning's
# next-batch broadcast) and would stop one batch after rank 1: a hang. With the agreed stop both stop after step 4.
RACE = ["+callbacks.signal_at.rank=1", "+callbacks.signal_at.hold=5", "+callbacks.signal_at.hold_rank=1"]


@pytest.mark.parametrize(("sig", "group", "extra", "stop", "submitit"),
                         [(signal.SIGTERM, False, ["+callbacks.signal_at.rank=0"], 4, False),
                          (signal.SIGINT, True, RACE, 4, False),
                          (signal.SIGUSR2, True, ["+callbacks.signal_at.rank=0"], 4, True),
                          (signal.SIGUSR2, True, ["+callbacks.signal_at.rank=0"], 4, False)],
                         ids=["sigterm-rank0", "sigint-group", "sigusr2-group-submitit", "sigusr2-group-plain"])
def test_ddp_interrupt_stops_all_ranks_together_then_resumes_exactly(ddp_reference, tmp_path, synthetic_root, sig,
                                                                       group, extra, stop, submitit):
    """SIGTERM to rank 0 only (the other rank learns it from the step's collective), Ctrl-C to the whole process
    group arriving while the ranks are at different points (``RACE``), submitit's SIGUSR2 to the whole group (rank 0
    alone requeues), and SIGUSR2 outside submitit (``sbatch --signal=USR2@90``: a stop like SIGTERM). Each: exit 2
    within 60 s (255 after submitit's requeue), a mid-epoch last.ckpt saved by both ranks together, and the resumed
    run equals the uninterrupted one."""
    run, stamp, record = tmp_path / "run", tmp_path / "sent", tmp_path / "requeued"
    extra = ["+callbacks.signal_at._target_=tests.helpers.SignalAt", "+callbacks.signal_at.step=4",
             f"+callbacks.signal_at.sig={int(sig)}", *extra,
             f"+callbacks.signal_at.group={str(group).lower()}", f"+callbacks.signal_at.stamp={stamp}"]
    if submitit:
        extra += ["+callbacks.requeue._target_=tests.helpers.SubmititRequeueStub",
                  f"+callbacks.requeue.record={record}"]
    code, err, gone = _run_group(_train(synthetic_root, run, *extra))
    # after the requeue, submitit's own handler ends rank 0 with sys.exit(-1) (255), as in a real submitit job;
    # the other rank (and rank 0 on SIGTERM/Ctrl-C) exits 2 with one line
    assert code == (255 if submitit else 2), err[-3000:]
    assert "error: " in err and "resume with: python -m segvoc.train resume=" in err, err[-3000:]
    assert gone - float(stamp.read_text()) < 60, "took more than 60 s to stop"
    assert "Traceback" not in err, err[-3000:]
    assert f"interrupted at step {stop}: saved" in err and f"(batch {stop - 3} of epoch 1)" in err, err[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == stop
    if submitit:
        assert record.read_text() == "rank 0\n"  # submitit's requeue ran once, on rank 0 only
    else:
        assert not record.exists() and f"stopped by {signal.Signals(sig).name.replace('SIGINT', 'Ctrl-C')}" in err
    assert not (run / "metrics.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "segvoc.train", f"resume={run}"], cwd=REPO_ROOT, env=_env(),
                             capture_output=True, text=True, timeout=HANG_GUARD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(run, ddp_reference)
