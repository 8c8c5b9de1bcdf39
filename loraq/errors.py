"""One error base; the API renders every AppError as `{"error": {"status", "message"}}`."""


class AppError(Exception):
    status = 400
    headers: dict[str, str] | None = None

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(AppError):
    status = 400


class Unauthorized(AppError):
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(AppError):
    status = 403


class NotFound(AppError):
    status = 404


class Conflict(AppError):
    status = 409


class TooLarge(AppError):
    status = 413


class UnsupportedMedia(AppError):
    status = 415


class Invalid(AppError):
    status = 422


class QuotaExceeded(AppError):
    status = 429
