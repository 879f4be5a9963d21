"""pimaster: the master daemon and command-line client."""

__version__ = "0.1.0"
