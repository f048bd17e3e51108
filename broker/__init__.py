"""The disclosure broker: holds every record until a guardian decides by email reply."""

__version__ = "0.1.0"
