"""`bnrt serve`'s hot path: ``POST /v2/models/NAME[/versions/V]/infer`` answered as plain ASGI in
front of the Starlette application, skipping its middleware, routing and request and response
objects (a quarter of the event loop's time per request on a small model). Paths are matched as
Starlette's ``{name}`` would match them (a non-empty segment), on the percent-decoded path."""

from __future__ import annotations

import json

from bnrt.deploy.kserve import HEADER_LENGTH


class Disconnected(Exception):
    """The client closed its connection before its request's body arrived."""


_HEADER_LENGTH = HEADER_LENGTH.lower().encode()  # as ASGI gives header names


def fast_infer(api, app):
    """``app`` with ``/v2/models/NAME[/versions/V]/infer`` answered in front of it by ``api.answer``
    (POST; other methods 405). Every other path goes to ``app``."""

    async def receive_chunks(receive):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Disconnected
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return

    async def entry(scope, receive, send):
        parts = scope["path"].split("/") if scope["type"] == "http" else ()
        if not (len(parts) in (5, 7) and parts[1] == "v2" and parts[2] == "models" and parts[3] and parts[-1] == "infer"
                and (len(parts) == 5 or (parts[4] == "versions" and parts[5]))):
            return await app(scope, receive, send)
        if scope["method"] != "POST":
            status, payload = 405, json.dumps({"error": f"{scope['method']} {scope['path']}: Method Not Allowed"})
            extra = [("content-type", "application/json"), ("allow", "POST")]
            payload = payload.encode()
        else:
            headers = dict(scope["headers"])
            length = headers.get(_HEADER_LENGTH)
            declared = headers.get(b"content-length")
            status, payload, extra = await api.answer(parts[3], parts[5] if len(parts) == 7 else None,
                                                      None if declared is None else declared.decode("latin-1"),
                                                      receive_chunks(receive),
                                                      None if length is None else length.decode("latin-1"))
        raw = [(k.lower().encode(), v.encode()) for k, v in extra] + [(b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})

    return entry
