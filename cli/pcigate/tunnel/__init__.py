"""Local tunnels: thin asyncio adapters over the pure protocol code (:mod:`pcigate.tunnel.pg`)."""
