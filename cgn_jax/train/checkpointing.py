"""Resumable training checkpoints: an Orbax CheckpointManager over one train-state pytree.

A checkpoint holds everything that decides the rest of the run (both networks'
parameters, BatchNorm statistics and optimizer states, the step and the run's RNG
key) plus a small JSON record, so re-running the same command continues the same
run bit for bit. Saving is asynchronous where Orbax supports it: the state is copied
to host memory first, and the write overlaps the following training steps.

The state is stored as Flax's state dict of the pytree (nested dicts), which Orbax
reads back without knowing the dataclasses; `restore` maps it onto a template.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from cgn_jax.checkpoint import CheckpointMismatchError, check_tree_matches


def _shapes(metadata):
    if metadata is None:
        return None
    tree = getattr(metadata, "tree", metadata)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree,
                        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def _entry_sizes(stored) -> dict[str, int] | None:
    """Top-level name -> number of tensors of a state's shapes (None if they are not a dict)."""
    if not isinstance(stored, dict):
        return None
    return {k: len(jax.tree.leaves(v)) for k, v in stored.items()}


class TrainCheckpoints:
    """`save(step, state, meta)` / `restore(template)` / `latest_step()` under `directory`, keeping the last k."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(max_to_keep)), create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        self._shapes_read: dict[int, Any] = {}  # a written step never changes, so its metadata is read once

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict | None = None) -> bool:
        """Start saving `state` (device or host arrays) as checkpoint `step`; False if it already exists."""
        step = int(step)
        if step in self._manager.all_steps():
            return False
        tree = flax.serialization.to_state_dict(jax.tree.map(np.asarray, jax.device_get(state)))
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(dict(meta or {}, step=step))), force=True)

    def stored_entries(self, step: int) -> dict[str, int] | None:
        """Top-level name -> number of tensors, of checkpoint `step`'s state (None if Orbax cannot say)."""
        return _entry_sizes(self._stored_shapes(step))

    def _stored_shapes(self, step: int):
        """Checkpoint `step`'s state as shapes, read from its metadata; None if this Orbax version cannot say."""
        if step not in self._shapes_read:
            try:
                shapes = _shapes(self._manager.item_metadata(step)["state"])
            except (KeyError, TypeError, AttributeError):
                shapes = None
            except Exception as e:  # Orbax/TensorStore raise many kinds of errors for damaged files
                raise self._unreadable(step, e) from e
            self._shapes_read[step] = shapes
        return self._shapes_read[step]

    def read_meta(self, step: int) -> dict:
        """The JSON record saved with checkpoint `step`."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise self._unreadable(step, e) from e
        return dict(restored["meta"] or {})

    def _unreadable(self, step: int, error: Exception) -> CheckpointMismatchError:
        """A damaged checkpoint, with the way back to the one before it."""
        older = [s for s in self.all_steps() if s < step]
        fix = (f"delete {self.directory / str(step)} to resume from checkpoint {older[-1]}" if older
               else "delete it and start again")
        return CheckpointMismatchError(f"checkpoint {self.directory / str(step)} is unreadable, corrupt or "
                                       f"incomplete ({type(error).__name__}: {str(error)[:300]}); {fix}, "
                                       "or use a new --workdir")

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state shaped like `template`, meta) of checkpoint `step` (default: the latest)."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = flax.serialization.to_state_dict(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), template))
        stored = self._stored_shapes(step)  # None: the restore below still checks shapes
        if stored is not None:
            try:
                check_tree_matches(target, stored, what=f"checkpoint {self.directory / str(step)}")
            except CheckpointMismatchError as e:
                raise CheckpointMismatchError(f"{e} (to train with this config, use a new --workdir)") from None
        # an empty entry of the template (a feature switched off) that a checkpoint from before the
        # entry existed lacks: Orbax would call that a structure mismatch, so it is left out and put back
        entries = _entry_sizes(stored)
        absent = [k for k, v in target.items() if not jax.tree.leaves(v) and entries is not None and k not in entries]
        target = {k: v for k, v in target.items() if k not in absent}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise self._unreadable(step, e) from e
        tree = {**jax.tree.map(np.asarray, restored["state"]), **{k: {} for k in absent}}
        state = flax.serialization.from_state_dict(template, tree)
        return state, dict(restored["meta"] or {})

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    @contextlib.contextmanager
    def closed_on_error(self):
        """Close when the block raises (a resume that fails, say), so no saver thread outlives the
        error; otherwise the caller goes on using the manager and closes it at the end."""
        try:
            yield self
        except BaseException:
            self._close_quietly()
            raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._close_quietly()

    def _close_quietly(self) -> None:
        with contextlib.suppress(Exception):  # the error that stopped the block is the one to report
            self.close()
