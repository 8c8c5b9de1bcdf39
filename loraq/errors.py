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


class ServiceUnavailable(AppError):
    """A store the service needs (the database, Redis) is not answering; the client retries."""

    status = 503
    RETRY_AFTER_S = 5

    def __init__(self, store: str):
        super().__init__(f"service unavailable: the {store} is not answering; retry in a few seconds")
        self.store = store
        self.headers = {"Retry-After": str(self.RETRY_AFTER_S)}


def unavailable_store(error: BaseException) -> str | None:
    """`database`, `redis` or `object store` when `error` (or one it was raised from) says that store cannot be
    reached or dropped the connection; None for any other error, bugs included."""
    import botocore.exceptions
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                              sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError)):
            return "database"
        if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
            return "database"
        if isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                              kombu.exceptions.OperationalError)):
            return "redis"  # kombu's: the Celery broker, which is the Redis
        if isinstance(error, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
            return "object store"  # LORAQ_STORAGE_URL's S3 endpoint
        error = error.__cause__ or error.__context__
    return None
