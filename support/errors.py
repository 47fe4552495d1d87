"""One error type for the mistakes a user can fix (a flag, a file, a row), and the one place
that prints it: every command's `main` runs inside `run_main`, so a UsageError raised anywhere
reaches the user as one line and exit status 2, never a traceback."""
import sys

class UsageError(Exception):
    """A mistake the user can fix (a flag, a file, a row). Raised where it is found; the entry
    points turn it into one line on stderr and exit status 2, never a traceback."""


def run_main(main):
    """Call an entry point's `main`; a UsageError becomes `error: ...` on one line and exit
    status 2."""
    try:
        return main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
