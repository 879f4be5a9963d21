"""piagent: the pimaster agent that runs on every Raspberry Pi."""

__version__ = "0.1.0"
