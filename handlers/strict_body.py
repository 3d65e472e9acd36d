"""Request bodies decoded by the framework, strictly: ``data: Model`` with
``dto=StrictBody[Model]``.

Litestar's own decoding of a ``data`` parameter converts leniently (``"2"`` becomes
``2``, ``1`` becomes ``True``), which SPEC §4 rules out. ``StrictBody`` is a Litestar
DTO that decodes the raw bytes straight into the msgspec ``Struct`` in strict mode
(one pass, no intermediate dict) and documents the request body as that ``Struct``'s
component schema.

msgspec stops at the first problem; SPEC §4 wants every broken rule listed. When a
body is refused, the refusal's ``details`` come from ``pipeline.request``'s checker
run over the body as JSON (it reports every rule, the same wording as the domain's
own refusals); only when that checker finds nothing (a rule only the ``Struct``
holds) do they come from msgspec's message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator
from typing import Any, ClassVar, Generic, TypeVar

import msgspec
from litestar.dto import AbstractDTO
from litestar.dto.data_structures import DTOFieldDefinition
from litestar.openapi.spec import Reference, Schema
from litestar.typing import FieldDefinition

from handlers.http_common import InvalidBody
from pipeline.request import RequestInvalid, validate_request

T = TypeVar("T")

_PATH_RE = re.compile(r"at `\$\.([^`\[]+)")


def body_details(raw: bytes, exc: msgspec.DecodeError | None) -> list[dict[str, str]]:
    """``[{field, message}]`` for a refused job request body ``raw``."""
    if not raw.strip():
        return [{"field": "body", "message": "required"}]
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        return [{"field": "body", "message": f"invalid JSON: {error}"}]
    except RecursionError:
        return [{"field": "body", "message": "JSON nested too deeply"}]
    try:
        validate_request(body)
    except RequestInvalid as invalid:
        return invalid.details
    message = str(exc) if exc is not None else "invalid"
    match = _PATH_RE.search(message)
    return [{"field": match[1] if match else "body", "message": message.split(" - at ")[0]}]


class StrictBody(AbstractDTO[T], Generic[T]):
    """A DTO that only decodes: ``msgspec.json.decode(raw, type=Model, strict=True)``."""

    _decoders: ClassVar[dict[type[Any], msgspec.json.Decoder[Any]]] = {}

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Generator[DTOFieldDefinition, None, None]:
        yield from ()  # no transfer model: the Struct itself is decoded

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False

    @classmethod
    def create_for_field_definition(
        cls, field_definition: FieldDefinition, handler_id: str, backend_cls: Any = None
    ) -> None:
        """Nothing to build per handler: one decoder per model, made here once."""
        if cls.model_type not in cls._decoders:
            cls._decoders[cls.model_type] = msgspec.json.Decoder(cls.model_type, strict=True)

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any
    ) -> Reference | Schema:
        result: Reference | Schema = schema_creator.for_field_definition(
            FieldDefinition.from_annotation(cls.model_type)
        )
        return result

    def decode_bytes(self, value: bytes) -> Any:
        try:
            return self._decoders[self.model_type].decode(value)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise InvalidBody("the job request is invalid", extra=body_details(value, exc)) from None

    def decode_builtins(self, value: dict[str, Any]) -> Any:
        try:
            return msgspec.convert(value, self.model_type, strict=True)
        except msgspec.ValidationError as exc:
            raise InvalidBody(
                "the job request is invalid", extra=body_details(json.dumps(value).encode(), exc)
            ) from None

    def data_to_encodable_type(self, data: Any) -> Any:
        return data
