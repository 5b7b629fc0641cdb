"""The one base of the errors a user can fix: a bad config, a missing input, an unreachable
service. ``asd`` (pipelines/cli.py) prints their message as one line and exits 2; ``asd --debug``
shows the traceback. Kept free of heavy imports so that the CLI can catch them cheaply."""

from __future__ import annotations

import errno
import os

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a user over a quota


class UserError(Exception):
    """A mistake or missing precondition on the user's side; the message names the key or file
    and the fix, on one line."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (MLflow's run to many lines), for one-line reports."""
    text = (getattr(err, "message", None) or str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def require_feature_store(store: str | os.PathLike, feature_version: str) -> None:
    """Stop with a :class:`UserError` when ``store`` holds no features of ``feature_version``:
    checked by ``asd train`` / ``asd score`` before Ray starts, instead of a FileNotFoundError
    traceback from deep inside the stage."""
    from pipelines.store import store_manifest  # deferred: pandas/torch; the CLI imports this module

    try:
        store_manifest(store, feature_version)
    except FileNotFoundError as err:
        raise UserError(str(err)) from err
