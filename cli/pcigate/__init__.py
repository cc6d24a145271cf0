"""pcigate: a just-in-time access broker CLI for card-data environments."""

__version__ = "0.1.0"
