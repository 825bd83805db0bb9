"""Exit codes of the command-line programs (the values of sysexits.h)."""

EX_OK = 0
EX_USAGE = 64  # bad command line
EX_DATAERR = 65  # the server refused a message
EX_UNAVAILABLE = 69  # no server reachable / a listener could not be opened
EX_SOFTWARE = 70  # internal error (a bug): see the log
EX_TEMPFAIL = 75  # timed out waiting for the server
EX_PROTOCOL = 76  # the other side broke the protocol (e.g. another version)
EX_NOPERM = 77  # the local socket exists but we may not use it
EX_CONFIG = 78  # configuration error
