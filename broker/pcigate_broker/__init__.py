"""pcigate-broker: the HTTP access broker (OIDC → policy → OpenBao dynamic credentials → recordings)."""

__version__ = "0.1.0"
