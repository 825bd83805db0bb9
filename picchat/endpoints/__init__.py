"""Adapters between the outside world (sockets, FIFOs) and the loop."""
