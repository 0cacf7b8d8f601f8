"""User-given locations: local paths or cloud URIs (``gs://bucket/run``), as ``epath.Path``.

``pathlib.Path("gs://bucket/run")`` collapses the double slash (``gs:/bucket/run``) and
``.absolute()`` prefixes the working directory, so every trainer workdir, data directory,
manual directory, checkpoint and evaluation output goes through :func:`as_path` instead:
``etils.epath`` keeps URIs verbatim and hands them to the matching storage backend (``gs://``
through ``tf.io.gfile`` or ``fsspec``/``gcsfs``, whichever is installed).

Object stores have no atomic rename and no append: code that relies on either checks
:func:`is_local` first.
"""

from __future__ import annotations

import os

from etils import epath

__all__ = ["as_path", "is_local"]


def is_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` is on the local filesystem (not a ``scheme://`` URI)."""
    return "://" not in os.fspath(path)


def as_path(location: str | os.PathLike, *, absolute: bool = False) -> epath.Path:
    """``location`` as an ``epath.Path``; URIs unchanged, local paths made absolute on request."""
    path = epath.Path(location)
    if absolute and is_local(path):
        path = path.absolute()
    return path
