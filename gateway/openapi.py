"""The gateway's OpenAPI description, served at ``GET /openapi.json`` (no key needed: it holds no
data). Written by hand for the endpoints the gateway serves; the fuzz suite
(``tests/integration/test_gateway_fuzz.py``) generates requests from the same shapes."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_HEADERS = [
    {"name": "X-Session-ID", "in": "header", "required": False,
     "schema": {"type": "string", "maxLength": 1024, "pattern": "^[A-Za-z0-9._:@+=-]+$"},
     "description": "A conversation, scoped to the caller's key (auth.session_id_max_chars)."},
    {"name": "X-Session-History", "in": "header", "required": False, "schema": {"type": "string", "enum": ["server"]}},
    {"name": "X-Priority", "in": "header", "required": False,
     "schema": {"type": "string", "enum": ["critical", "normal", "batch"]},
     "description": "critical only for keys with allow_critical (others get 403)."},
    {"name": "X-Request-ID", "in": "header", "required": False, "schema": {"type": "string"}},
]
_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": 16},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "seed": {"type": "integer"},
    "min_tokens": {"type": "integer", "minimum": 0},
    "ignore_eos": {"type": "boolean"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "user": {"type": "string"},
}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
        "type": "object", "required": ["type"], "properties": {"type": {"type": "string"}, "text": {"type": "string"}}}}]},
}}
_RESPONSES = {
    "200": {"description": "The completion (JSON), or an SSE stream when stream is true."},
    "400": {"description": "A client mistake.", "content": {"application/json": {"schema": _ERROR}}},
    "401": {"description": "Missing or invalid key.", "content": {"application/json": {"schema": _ERROR}}},
    "403": {"description": "Not allowed for this key.", "content": {"application/json": {"schema": _ERROR}}},
    "404": {"description": "Unknown model.", "content": {"application/json": {"schema": _ERROR}}},
    "408": {"description": "The body did not arrive in time.", "content": {"application/json": {"schema": _ERROR}}},
    "413": {"description": "Body over server.max_body_bytes.", "content": {"application/json": {"schema": _ERROR}}},
    "422": {"description": "A value of the wrong type or range.", "content": {"application/json": {"schema": _ERROR}}},
    "429": {"description": "A per-key limit or a shed.", "content": {"application/json": {"schema": _ERROR}}},
    "503": {"description": "No capacity right now (Retry-After).", "content": {"application/json": {"schema": _ERROR}}},
}


def openapi_spec() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "unbroken gateway", "version": "1",
                 "description": "OpenAI-compatible API in front of model replicas."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type", "param", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": "string", "nullable": True},
                               "code": {"type": "string", "nullable": True}}}}}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": {"post": {
                "parameters": _HEADERS, "responses": _RESPONSES,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["messages"],
                    "properties": {**_SAMPLING, "messages": {"type": "array", "items": _MESSAGE},
                                   "max_completion_tokens": {"type": "integer", "minimum": 1}}}}}}}},
            "/v1/completions": {"post": {
                "parameters": _HEADERS, "responses": _RESPONSES,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["prompt"],
                    "properties": {**_SAMPLING, "echo": {"type": "boolean"}, "logprobs": {"type": "integer"},
                                   "prompt": {"oneOf": [
                                       {"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                       {"type": "array", "items": {"type": "integer", "minimum": 0}}]}}}}}}}},
            "/v1/models": {"get": {"responses": {"200": {"description": "The models in rotation."},
                                                 "401": _RESPONSES["401"]}}},
            "/healthz": {"get": {"security": [], "responses": {"200": {"description": "Alive."}}}},
            "/readyz": {"get": {"security": [], "responses": {"200": {"description": "A replica is healthy."},
                                                              "503": {"description": "None is."}}}},
            "/metrics": {"get": {"security": [], "responses": {"200": {"description": "Prometheus text."}}}},
            "/admin/replicas": {"get": {"responses": {"200": {"description": "Every replica's state."},
                                                      "401": _RESPONSES["401"], "403": _RESPONSES["403"]}}},
            "/admin/replicas/{replica_id}/drain": {"post": {
                "parameters": [{"name": "replica_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "Drained."}, "404": _RESPONSES["404"]}}},
        },
    }
