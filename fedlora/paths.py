"""Paths that a user gives (a config key, an environment variable, a node config entry), made absolute
once, in the process that reads them.

A relative path means something only to a process started in the folder the user meant: a SuperLink
or a SuperNode runs its apps in folders of its own. So each path is resolved against the working
directory of the process that reads it, and when a relative one leads nowhere, the error says both the
path as given and the folder it was resolved against.
"""

from __future__ import annotations

import os

from fedlora.errors import DataError


def absolute(given: str | os.PathLike, what: str, must_exist: bool = False) -> str:
    """`given`, with ~ expanded, as an absolute path; `what` names where it came from ("data.root",
    "FEDLORA_DATA", ...). With `must_exist`, a relative path that leads nowhere raises DataError
    naming the folder it was resolved against (a missing absolute path is left to the caller's own
    checks, which know what should be there)."""
    expanded = os.path.expanduser(str(given))
    resolved = os.path.abspath(expanded)
    if must_exist and not os.path.isabs(expanded) and not os.path.exists(resolved):
        raise DataError(f"{what} {given} does not exist: it is relative, and resolved against {os.getcwd()} (the "
                        f"working directory of this process) it is {resolved}. Processes started by a SuperLink or "
                        "a SuperNode run in folders of their own: give them absolute paths")
    return resolved
