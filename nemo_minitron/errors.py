"""The one error type for problems the user can fix (bad config, bad input files, a full disk).

The CLI turns it into a single line on stderr and exit status 2, before any compute starts when the problem
is in the input.
"""

from __future__ import annotations

import errno
from typing import Optional


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class StoppedEarly(Exception):
    """A driver stage (``run``, ``bench``) whose distillation was stopped by SIGTERM: its checkpoint is kept and
    the stage is not recorded as finished. The CLI prints the message and exits with status 0, as ``distill``
    does after a SIGTERM; the same command resumes."""


# Storage problems the user fixes outside the program: full disk or quota, a file size limit, a read-only or
# unwritable file system, a path through a regular file.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.ENOTDIR})


def storage_error(exc: OSError) -> Optional[UserError]:
    """``exc`` as a one-line UserError when it is a storage problem (see STORAGE_ERRNOS), else None."""
    if exc.errno not in STORAGE_ERRNOS:
        return None
    where = f"cannot write {exc.filename}" if exc.filename else "a write failed"
    return UserError(f"{where}: {exc.strerror or errno.errorcode.get(exc.errno, exc.errno)}")
