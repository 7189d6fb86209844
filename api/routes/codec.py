"""``/codec``: the codec server of Temporal's remote codec protocol, so that an operator's Temporal
Web UI and ``temporal`` CLI show the payloads xpando encrypts (README, "Private payloads").

``POST /codec/decode`` and ``POST /codec/encode`` take and answer ``{"payloads": [...]}`` (the
``Payloads`` message in protobuf JSON, bytes in base64), with the same keys as the API's own
Temporal client. They need a key with ``codec:decode``: whoever holds one reads every prompt and
answer. A Web UI page calls them from the browser, so ``/codec`` (and nothing else) answers CORS
for the origins in ``XPANDO_CODEC_CORS_ORIGINS``.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope
from temporalio.api.common.v1 import Payload

from api.deps import AuthRoute, SettingsDep, TemporalClientDep, require
from api.errors import ApiError, responses
from api.schemas import CodecPayload, CodecPayloads
from xpando.auth.keys import Scope
from xpando.payload_codec import (
    PAYLOAD_KEY_UNKNOWN,
    PayloadCipher,
    PayloadKeyError,
    decode_base64,
)
from xpando.settings import Settings

PREFIX = "/codec"

router = APIRouter(
    prefix=PREFIX,
    tags=["codec"],
    route_class=AuthRoute,
    dependencies=[Depends(require(Scope.CODEC_DECODE))],
)

NamespaceHeader = Annotated[
    str | None,
    Header(
        alias="X-Namespace",
        max_length=255,
        description="The namespace the payloads are from (the Web UI and the CLI send it); "
        "only this API's namespace is served",
    ),
]


def _cipher(
    client: TemporalClientDep, settings: SettingsDep, namespace: NamespaceHeader = None
) -> PayloadCipher:
    """The API's own payload codec; 404 for another namespace than the API's, or when the API
    has no payload key."""
    if namespace is not None and namespace != settings.temporal_namespace:
        raise ApiError(
            404,
            "namespace_not_served",
            f"this codec serves namespace {settings.temporal_namespace!r} only, not {namespace!r}",
        )
    codec = client.data_converter.payload_codec
    if not isinstance(codec, PayloadCipher):
        raise ApiError(
            404,
            "codec_off",
            "this API has no XPANDO_PAYLOAD_KEY: its payloads are in clear text, and it has no "
            "key to decode or encode any",
        )
    return codec


CipherDep = Annotated[PayloadCipher, Depends(_cipher)]


@router.post(
    "/decode", response_model=CodecPayloads, responses=responses(400, 401, 403, 404, 413, 422)
)
async def decode(body: CodecPayloads, cipher: CipherDep) -> CodecPayloads:
    """Decrypt the payloads xpando encrypted; any other payload comes back as it was sent.
    ``422 payload_key_unknown`` names a key id this API does not hold,
    ``422 payload_undecryptable`` a payload the key of its id does not open."""
    try:
        decoded = await cipher.decode(_payloads(body.payloads))
    except PayloadKeyError as err:
        code = "payload_key_unknown" if err.type == PAYLOAD_KEY_UNKNOWN else "payload_undecryptable"
        raise ApiError(422, code, err.message) from None
    return _body(decoded)


@router.post(
    "/encode", response_model=CodecPayloads, responses=responses(400, 401, 403, 404, 413, 422)
)
async def encode(body: CodecPayloads, cipher: CipherDep) -> CodecPayloads:
    """Encrypt payloads with the current key (what ``temporal workflow start --codec-endpoint``
    uses for its ``--input``)."""
    return _body(await cipher.encode(_payloads(body.payloads)))


def _payloads(payloads: Sequence[CodecPayload]) -> list[Payload]:
    return [
        Payload(
            metadata={key: decode_base64(value) for key, value in p.metadata.items()},
            data=decode_base64(p.data),
        )
        for p in payloads
    ]


def _body(payloads: Sequence[Payload]) -> CodecPayloads:
    return CodecPayloads(
        payloads=[
            CodecPayload(
                metadata={key: _b64(value) for key, value in p.metadata.items()},
                data=_b64(p.data),
            )
            for p in payloads
        ]
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def install(app: FastAPI, settings: Settings) -> None:
    """CORS on ``/codec`` only, for the Web UI's origins: the rest of the API is not called
    from a browser page."""
    app.add_middleware(CodecCors, origins=settings.codec_cors_origins)


class CodecCors:
    """Starlette's CORS middleware, on the ``/codec`` paths alone. The Web UI sends
    ``Content-Type: application/json`` and ``X-Namespace`` (and, configured so, ``Authorization``),
    so its browser asks first with a preflight ``OPTIONS``, which this answers. Credentials are
    allowed for a Web UI that sends cookies (``includeCredentials``) to a proxy in front of the
    API; xpando itself reads no cookie."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_methods=["POST"],
            allow_headers=["Authorization", "Content-Type", "X-Namespace"],
            allow_credentials=True,
            max_age=600,
        )

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
