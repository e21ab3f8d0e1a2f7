"""Why this process may not read or write a path, and how to let it: the line an operator needs when the
container's uid (10001) meets files that belong to someone else (a host checkout mounted over /app, a state
folder or a key made by another user).

The fixes are the same everywhere: run as the owner (`docker run --user UID:GID`), or give the path to the uid
the program runs as (`chown UID`). Root as the owner is never proposed: the image runs unprivileged.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

PERMISSION_ERRNOS = (errno.EACCES, errno.EPERM)
FILE_FIX = "`chown {uid}` it (on the host, for a mounted file)"
FOLDER_FIX = "`chown -R {uid}` it (on the host, for a mounted folder)"


def is_permission_error(exc: OSError) -> bool:
    return exc.errno in PERMISSION_ERRNOS


def access_fix(path: Path, give: str = FILE_FIX, owned_by: Path | None = None) -> str:
    """`by uid 10001 (owner uid 1000, mode 0600): run as its owner (`docker run --user 1000:1000`) or GIVE`.

    `owned_by`: the path whose owner decides (the parent folder, when `path` cannot be created in it); `give`
    may name `{uid}`, the uid this process runs as.
    """
    uid = os.geteuid()
    give = give.replace("{uid}", str(uid))
    decides = owned_by or path
    try:
        info = decides.stat()
    except PermissionError:  # a folder above it does not let this uid in
        return f"by uid {uid} (a folder above {decides} does not let uid {uid} in): {give}"
    except OSError:
        return f"by uid {uid}: {give}"
    where = f"{decides}: " if owned_by else ""
    owner = f"{where}owner uid {info.st_uid}, mode {info.st_mode & 0o7777:04o}"
    if info.st_uid == uid:
        return f"by uid {uid} ({owner}): `chmod u+rwX` it"
    if info.st_uid == 0:
        return f"by uid {uid} ({owner}): {give}"
    return f"by uid {uid} ({owner}): run as its owner (`docker run --user {info.st_uid}:{info.st_gid}`) or {give}"


def folder_creation_fix(folder: Path) -> str:
    """access_fix for a folder that cannot be created: the nearest existing folder above it decides."""
    parent = next((p for p in folder.parents if p.exists()), Path("/"))
    give = f"create it for uid {{uid}} in {parent} (or the host folder mounted there): " \
           f"`mkdir {folder.name} && chown {{uid}} {folder.name}`"
    return access_fix(folder, give, parent)
