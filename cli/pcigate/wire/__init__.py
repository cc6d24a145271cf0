"""Pure PostgreSQL wire protocol code: framing (:mod:`pcigate.wire.pg`), SCRAM/md5 (:mod:`.scram`).

Nothing in this package does I/O; the asyncio adapter lives in :mod:`pcigate.tunnel.pg`.
"""
