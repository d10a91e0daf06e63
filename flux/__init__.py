"""Flux: a function runtime with built-in debugging."""

import signal

# What stops a Flux process gracefully: Ctrl-C, a service manager, and a closed terminal or
# dropped ssh session (SIGHUP would otherwise kill it at once, leaving queued traces unwritten
# and `flux dev`'s embedded server running).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
