"""The one error type for problems the user can fix (bad config, bad input files).

The CLI turns it into a single line on stderr and exit status 2, before any compute starts.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
