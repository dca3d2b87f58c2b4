"""Training checkpoints: Orbax CheckpointManager over (train state, data iterator, config).

A checkpoint step folder holds three items:

  state/   the TrainState (params, optimizer state, EMA, step), an Orbax StandardSave tree;
  data/    each process's data-iterator state as JSON (grain's checkpoint handler:
           ``process_{i}-of-{n}.json``);
  config/  the run's config as JSON, for the record.

Saves are asynchronous (training continues while the arrays are written); only the last
``keep`` checkpoints stay. Restoring takes target shardings, so a checkpoint written on one
mesh (or by one process count) restores onto another. Preemption (SIGTERM) is noticed by
:class:`PreemptionWatch`; the loop then finishes its step, saves and waits for the write.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from snapjax import storage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")


class TrainCheckpointer:
    """Saves and restores (state, data iterator, config) under ``directory``."""

    def __init__(self, directory: str | epath.Path, cfg: CheckpointConfig):
        self.directory = storage.path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True,
            # A run killed mid-save leaves a temporary folder: never a checkpoint, remove it.
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, config_json: dict) -> None:
        """Starts an (async) save of ``step``; returns once the arrays are copied off device."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config_json))
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """The state at ``step`` laid out as ``abstract_state`` (ShapeDtypeStructs with target
        shardings); ``data_iterator`` (if given) is moved to where that step left the data."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        if data_iterator is not None:
            data_iterator.set_state(self._data_state(step))
        return restored["state"]

    def saved_config(self, step: int) -> dict:
        """The config JSON saved with ``step``."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"] or {}

    def _data_state(self, step: int) -> dict:
        folder = self.directory / str(step) / "data"
        index, count = jax.process_index(), jax.process_count()
        exact = folder / f"process_{index}-of-{count}.json"
        if exact.is_file():
            return json.loads(exact.read_text())
        # Another process count wrote it: any process's state gives the global batch number,
        # from which the pipeline continues in the new layout.
        saved = sorted(folder.glob("process_*-of-*.json"))
        if not saved:
            raise FileNotFoundError(f"checkpoint {self.directory / str(step)} has no data "
                                    f"iterator state in {folder}")
        log.warning("data state of step %d was saved by another process layout (%s); "
                    "resuming at the same global batch", step, saved[0].name)
        return json.loads(saved[0].read_text())

    def wait(self) -> None:
        """Blocks until every pending async save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionWatch:
    """Has a preemption notice (SIGTERM) arrived? Agreed across processes.

    Multi-process runs use JAX's preemption sync manager (started by
    ``jax.distributed.initialize``, which catches SIGTERM itself): every process reaches the
    same step before it reports True. A single process catches SIGTERM here.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._distributed = jax.process_count() > 1
        self._previous = None
        if not self._distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM: finishing the current step, then saving a checkpoint")
        self._flag.set()

    def reached(self, step: int) -> bool:
        if self._distributed:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled
                return False
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
