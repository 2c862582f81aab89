"""The error a request gets from the assistant's HTTP API: a status and an
OpenAI-style JSON body, raised by the engine, the API and the server alike."""

from typing import Optional


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, code: Optional[str] = None,
                 param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


def busy(message: str) -> RequestError:
    return RequestError(503, message, code="server_busy")
