"""Training checkpoints: orbax ``CheckpointManager`` with the train state and the data state.

Each step directory holds two items: ``state`` (``TrainState``: params, optimiser state, step,
RNG key data; ``StandardSave``) and ``data`` (JSON: the Grain iterator's ``get_state()`` and
run bookkeeping such as the wall-clock minutes used so far). Orbax writes to a temporary
directory and renames it when complete (atomic); ``keep`` last checkpoints are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class TrainCheckpointer:
    """``save(step, state, data)``, ``restore_latest(state_template) -> (state, data) | None``."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: dict) -> None:
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore_latest(self, state_template: Any) -> tuple[Any, dict] | None:
        """Restores the newest checkpoint onto the shardings/shapes of ``state_template``."""
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_template)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["data"])

    def close(self) -> None:
        self.manager.close()
