"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lanner.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         503: "service_unavailable", 500: "internal_error"}


UNION_LABELS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def bad_param(exc: ValueError, default_param: str | None = None) -> APIError:
    """A ValueError from SamplingParams ('SamplingParams.top_p must be ...') or the engine, as a 400."""
    message = str(exc)
    param = default_param
    if message.startswith("SamplingParams."):
        param = message[len("SamplingParams."):].split(" ", 1)[0]
        message = message[len("SamplingParams."):]
    return APIError(400, message, param)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    # drop 'body' and pydantic's union-branch labels ('str', 'list[int]', 'function-after[...]')
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not (isinstance(p, str) and
                                                                        (p in UNION_LABELS or "[" in p))]
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    param = ".".join(loc) or None
    where = f"{param}: " if param else "request body: "
    return where + err.get("msg", "invalid value"), param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
