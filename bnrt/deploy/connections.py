"""The connections of `bnrt serve`'s HTTP side: uvicorn's HTTP protocol with limits on idle and
half-sent connections and on how many are open at once."""

from __future__ import annotations


def limited_http_protocol(max_connections: int):
    """uvicorn's HTTP protocol, with limits: its keep-alive timer ran only between requests, so a
    connection that never sent one, or stopped half-way, stayed open (enough of them exhaust the file
    descriptors). Here it also runs from the connection's start and while a request arrives, and a
    connection beyond ``max_connections`` is closed as soon as it is accepted."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class Limited(Base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()
            else:
                self._idle()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            receiving = self.cycle is None or self.cycle.response_complete or self.cycle.more_body
            if receiving and not self.transport.is_closing():
                self._idle()

        def timeout_keep_alive_handler(self) -> None:
            if self.flow.read_paused:  # the server stopped reading (its buffer is full): the client is not idle
                self._idle()
            elif not self.transport.is_closing():  # h11's own handler cannot close mid-request
                self.transport.close()

        def _idle(self) -> None:
            self._unset_keepalive_if_required()
            handler = self.timeout_keep_alive_handler
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, handler)

    return Limited


def default_max_connections() -> int:
    """The open-file limit less 64 descriptors for the server's own files and sockets."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 16 if soft == resource.RLIM_INFINITY else max(1, soft - 64)
