from typing import Any

class Relay:
    def __init__(
        self,
        message_cls: Any,
        client_allowed: bytes,
        client_wanted: bytes,
        client_keep: int,
        server_allowed: bytes,
        server_wanted: bytes,
        server_keep: int,
        max_len: int,
        /,
    ) -> None: ...
    def add(self, client_fd: int, server_fd: int, from_client: bytes, from_server: bytes, /) -> int: ...
    def close(self, id: int, to_client: bytes, to_server: bytes, /) -> tuple[int, int]: ...
    def drain(self) -> list[tuple[int, int, float, Any]]: ...
    def fileno(self) -> int: ...
    def shutdown(self) -> None: ...
