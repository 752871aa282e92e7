"""The Open Inference Protocol (KServe V2, REST) for a tagger: request parsing, output tensors.

The model takes one input, ``TEXT``: BYTES, shape ``[n]``, one UTF-8 sentence per element
(raw text, split into words by the bundle's tokenizer). Its outputs are plain tensors any V2
client decodes without knowing pyxtask:

* token tasks, flattened over the request's words in order: ``words`` (BYTES ``[W]``),
  ``labels`` (BYTES ``[W]``; ``""`` for a word the tokenizer turns into no sub-word), ``scores``
  (FP32 ``[W]``, each label's probability) and ``word_counts`` (INT32 ``[n]``: sentence ``i``
  owns the next ``word_counts[i]`` words, so ``np.split(labels, np.cumsum(word_counts)[:-1])``
  gives the per-sentence lists). Flattened rather than one JSON string per sentence, so that
  scores stay FP32 numbers and binary clients need no second decoding step;
* sentence tasks: ``labels`` (BYTES ``[n]``), ``scores`` (FP32 ``[n]``) and ``probabilities``
  (FP32 ``[n, L]``, columns in the order of the model metadata's ``parameters.labels``).

The binary tensor data extension is supported both ways (tritonclient uses it by default): a
request with an ``Inference-Header-Content-Length`` header carries its JSON header first and
then each input's raw bytes (``parameters.binary_data_size``); BYTES elements are a 4-byte
little-endian length and the bytes. Outputs are returned as binary when asked for
(``parameters.binary_data`` on an output, or ``binary_data_output`` on the request).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr
from pydantic import ValidationError as _ValidationError

from pyxtask.serving.tagger import Tagged

INPUT = "TEXT"
VERSION = "1"
PLATFORM = "onnxruntime"
HEADER_LENGTH = "inference-header-content-length"
_LENGTH = struct.Struct("<I")


class InferError(Exception):
    """A request the client must fix: ``status`` 400, or 413 past a size limit."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- the protocol's JSON shapes (also the OpenAPI schema) ---------------------------------------


class _Open(BaseModel):
    # The protocol lets clients add fields; unknown ones are ignored rather than refused.
    model_config = ConfigDict(strict=True, extra="ignore")


def _integral(value: Any) -> Any:
    # JSON Schema's "integer" includes 2.0, and some JSON encoders write whole numbers so.
    return int(value) if isinstance(value, float) and value.is_integer() else value


class RequestInput(_Open):
    name: Literal["TEXT"]
    shape: Annotated[
        list[Annotated[StrictInt, Field(ge=1), BeforeValidator(_integral)]],
        Field(min_length=1, max_length=1, description="[n]: n sentences"),
    ]
    datatype: Literal["BYTES"]
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[StrictStr] | None = Field(
        default=None, description="the n sentences; absent when sent as binary data"
    )


class RequestOutput(_Open):
    name: Literal["words", "labels", "scores", "word_counts", "probabilities"] = Field(
        description="one of the model's outputs (its metadata lists them)"
    )
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(_Open):
    id: StrictStr | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[str | float | int] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


# -- metadata ----------------------------------------------------------------------------------


def output_specs(kind: str, labels: Sequence[str]) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every output, in order; -1 marks a dimension that varies."""
    if kind == "sentence":
        return [
            ("labels", "BYTES", [-1]),
            ("scores", "FP32", [-1]),
            ("probabilities", "FP32", [-1, len(labels)]),
        ]
    return [
        ("words", "BYTES", [-1]),
        ("labels", "BYTES", [-1]),
        ("scores", "FP32", [-1]),
        ("word_counts", "INT32", [-1]),
    ]


def model_metadata(name: str, kind: str, task: str, labels: Sequence[str]) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": n, "datatype": d, "shape": s} for n, d, s in output_specs(kind, labels)
        ],
        # Not in the protocol's metadata, which has no place for a label set: the column order
        # of `probabilities` and what the labels mean.
        "parameters": {"task": task, "kind": kind, "labels": list(labels)},
    }


# -- requests ----------------------------------------------------------------------------------


@dataclass
class InferCall:
    """A parsed request: its sentences, ``id``, and the outputs to return (name, binary)."""

    sentences: list[str]
    id: str | None
    outputs: list[tuple[str, bool]]


def _validation_message(exc: _ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"invalid inference request: {where}: {first['msg']}{more}"


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary data after it."""
    if header_length is None:
        return body, b""
    try:
        size = int(header_length)
    except ValueError:
        raise InferError(f"invalid Inference-Header-Content-Length {header_length!r}") from None
    if not 0 <= size <= len(body):
        raise InferError(
            f"Inference-Header-Content-Length is {size}, but the body has {len(body)} bytes"
        )
    return body[:size], body[size:]


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InferError(f"{where} is not valid UTF-8 (byte {exc.start})") from None


def _binary_strings(raw: bytes, count: int) -> list[str]:
    """``count`` BYTES elements, each a 4-byte little-endian length and then the bytes."""
    out: list[str] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InferError(f"{INPUT}: binary data ends inside an element's length")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InferError(f"{INPUT}[{len(out)}]: binary element runs past the data")
        out.append(_decode(raw[offset : offset + size], f"{INPUT}[{len(out)}]"))
        offset += size
    if len(out) != count:
        raise InferError(f"{INPUT} has shape [{count}] but its binary data holds {len(out)}")
    return out


def _json_strings(data: list[str] | None, count: int) -> list[str]:
    if data is None:
        raise InferError(f"{INPUT} has no data (neither 'data' nor binary_data_size)")
    if len(data) != count:
        raise InferError(f"{INPUT} has shape [{count}] but {len(data)} data element(s)")
    return list(data)


def _sentences(request: InferRequest, binary: bytes, max_sentences: int) -> list[str]:
    # The request model has already fixed the name (TEXT), datatype (BYTES) and shape ([n]).
    tensor = request.inputs[0]
    count = tensor.shape[0]
    if count > max_sentences:
        raise InferError(f"{count} sentences in one request; the limit is {max_sentences}", 413)
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise InferError(f"{len(binary)} bytes of binary data that no input claims")
        return _json_strings(tensor.data, count)
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise InferError(
            f"{INPUT} binary_data_size is {size!r}, but {len(binary)} bytes follow the header"
        )
    if tensor.data is not None:
        raise InferError(f"{INPUT} has both 'data' and binary_data_size")
    return _binary_strings(binary, count)


def _flag(parameters: dict[str, Any], key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise InferError(f"parameter {key!r} must be true or false, got {value!r}")
    return value


def _outputs(request: InferRequest, available: Sequence[str]) -> list[tuple[str, bool]]:
    default = _flag(request.parameters, "binary_data_output", False)
    if request.outputs is None:
        return [(name, default) for name in available]
    chosen: list[tuple[str, bool]] = []
    for output in request.outputs:
        if output.name not in available:
            raise InferError(f"unknown output {output.name!r}; the model has {list(available)}")
        if any(output.name == name for name, _ in chosen):
            raise InferError(f"output {output.name!r} is requested twice")
        if "classification" in output.parameters:
            raise InferError("the classification extension is not supported")
        chosen.append((output.name, _flag(output.parameters, "binary_data", default)))
    return chosen


def parse_infer(
    body: bytes, header_length: str | None, *, max_sentences: int, outputs: Sequence[str]
) -> InferCall:
    """The request in ``body``, checked completely, or an :class:`InferError` naming the fault."""
    head, binary = _split(body, header_length)
    if not head.strip():
        raise InferError(
            'request body is empty; send JSON like {"inputs": [{"name": "TEXT", '
            '"shape": [1], "datatype": "BYTES", "data": ["a sentence"]}]}'
        )
    try:
        request = InferRequest.model_validate_json(head)
    except _ValidationError as exc:
        raise InferError(_validation_message(exc)) from None
    return InferCall(
        _sentences(request, binary, max_sentences), request.id, _outputs(request, outputs)
    )


# -- responses ---------------------------------------------------------------------------------


def _tensors(kind: str, results: Sequence[Tagged]) -> dict[str, tuple[list[Any], list[int]]]:
    """Each output's values (flat, row-major) and shape."""
    if kind == "sentence":
        labels = [r.label or "" for r in results]
        width = len(results[0].probabilities or {}) if results else 0
        probabilities = [p for r in results for p in (r.probabilities or {}).values()]
        return {
            "labels": (labels, [len(results)]),
            "scores": ([r.score or 0.0 for r in results], [len(results)]),
            "probabilities": (probabilities, [len(results), width]),
        }
    words = [w for r in results for w in r.words]
    return {
        "words": (words, [len(words)]),
        "labels": ([label or "" for r in results for label in r.labels], [len(words)]),
        "scores": ([s for r in results for s in r.scores], [len(words)]),
        "word_counts": ([len(r.words) for r in results], [len(results)]),
    }


_NUMPY = {"FP32": "<f4", "INT32": "<i4"}


def _binary(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        parts = []
        for value in values:
            raw = value.encode("utf-8")
            parts.append(_LENGTH.pack(len(raw)) + raw)
        return b"".join(parts)
    return np.asarray(values, dtype=_NUMPY[datatype]).tobytes()


def _json(datatype: str, values: list[Any]) -> list[Any]:
    if datatype == "BYTES":
        return values
    # Through the declared type, so JSON and binary answers carry the same numbers.
    return list(np.asarray(values, dtype=_NUMPY[datatype]).tolist())


def encode_response(
    *,
    model_name: str,
    kind: str,
    labels: Sequence[str],
    call: InferCall,
    results: Sequence[Tagged],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (binary outputs add Inference-Header-Content-Length)."""
    datatypes = {name: datatype for name, datatype, _ in output_specs(kind, labels)}
    tensors = _tensors(kind, results)
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in call.outputs:
        values, shape = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatypes[name], "shape": shape}
        if binary:
            raw = _binary(datatypes[name], values)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json(datatypes[name], values)
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model_name, "model_version": VERSION}
    if call.id is not None:
        head["id"] = call.id
    head["outputs"] = outputs
    header = json.dumps(head, ensure_ascii=False, allow_nan=False).encode("utf-8")
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }
