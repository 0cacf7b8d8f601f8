"""Click simulation (RITM rule) on the host and in JAX."""

from samref_jax.interaction.clicker import (
    Click,
    ClickState,
    has_error,
    next_click,
    next_click_jax,
    squared_edt_jax,
)

__all__ = ["Click", "ClickState", "has_error", "next_click", "next_click_jax", "squared_edt_jax"]
