"""Several sweeper processes on one Optuna study (the same ``hparams_search=optuna`` command started more than once,
on one host or on nodes sharing the storage): the lock they take turns with, the trial budget they share and the
seeds of their samplers.

The lock (``trials_lock``) is an ``fcntl.flock`` on a file beside the storage: ``<journal>.trials.lock`` or
``<sqlite file>.trials.lock``; for a database server (``postgresql://...``), ``<sweep dir>/.trials.lock``. The kernel
releases it when its holder dies. Holding it, a worker counts the study's trials and asks for the next ones, so two
workers never both take the last of ``n_trials``; it also orders the workers' first asks, which gives each its own
seed (``worker_seed``), and it makes re-queueing an interrupted trial happen once. With a database server, only the
workers that share the sweep directory take turns: workers on nodes that do not share it may each take one trial
past ``n_trials`` at the end, and may get the same seed.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from segvoc.errors import StudyError

# user attribute of a queued trial: the number of the interrupted trial whose parameters it runs again
RETRY_ATTR = "segvoc_retry_of"
# user attribute of every trial a sweeper asked for: the seed of that sweeper's sampler
SEED_ATTR = "segvoc_sampler_seed"


def storage_file(url: str | None) -> Path | None:
    """The file holding the study of ``hydra.sweeper.storage``: ``journal:<file>`` or ``sqlite:///<file>``; None
    for no storage, an in-memory SQLite database or a database server."""
    if not url:
        return None
    url = str(url)
    if url.startswith("journal:"):
        return Path(url[len("journal:"):]).expanduser()
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def trials_lock_path(url: str | None, sweep_dir: str | Path) -> Path | None:
    """The lock file the workers of a study share (module docstring); None: no storage, one process."""
    file = storage_file(url)
    if file is not None:
        return file.with_name(file.name + ".trials.lock")
    if not url or str(url).startswith("sqlite:"):  # in memory: one process
        return None
    return Path(sweep_dir) / ".trials.lock"


@contextmanager
def trials_lock(path: Path | None) -> Iterator[None]:
    """Hold the study's trials lock (``path`` None: nothing to hold). The file is created if needed, never
    truncated."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise StudyError(f"{path}: cannot lock this file ({exc.strerror}); keep the study on a file system with "
                             "file locks (a local disk, NFSv4), or in a database: hydra.sweeper.storage="
                             "postgresql://...") from exc
        yield
    finally:
        os.close(fd)  # releases the lock


def trials_taken(trials: Sequence[Any]) -> int:
    """How many of ``n_trials`` a study has used: its running and finished trials, less the failed ones whose
    parameters were queued again (an interrupted trial and its retry count once). Queued (WAITING) trials count
    once a worker asks for them."""
    from optuna.trial import TrialState

    retried = {t.user_attrs[RETRY_ATTR] for t in trials if RETRY_ATTR in t.user_attrs}
    return sum(t.state != TrialState.WAITING and not (t.state == TrialState.FAIL and t.number in retried)
               for t in trials)


def worker_seed(seed: int, trials: Sequence[Any]) -> int:
    """The seed of a worker's sampler: the configured ``seed`` plus the number of trials the study has handed out
    (all but WAITING ones), read under the trials lock just before the worker's first ask. Every ask hands out one
    more trial, so each worker of a study gets a seed no other worker had (also across launches); for one worker the
    seed depends only on the study, so the same command on the same study draws the same points."""
    from optuna.trial import TrialState

    return int(seed) + sum(t.state != TrialState.WAITING for t in trials)
