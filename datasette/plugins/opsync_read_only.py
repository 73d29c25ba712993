"""Datasette is read-only for everyone: refuse every write-shaped request to databases, tables and queries.

Datasette 0.65.5 already opens the file read-only for SQL (``?sql=`` accepts only SELECT) and the
metadata defines no writable canned query, but a POST to a canned query still reaches the query
code (asgi-csrf lets cookie-less requests through), where 0.65.5 fails with a 500. This makes the
rule explicit and independent of the metadata: only GET, HEAD and OPTIONS reach a database path;
POST stays possible under ``/-/`` (sign-out, messages, the sign-in plugins), which never touch data.
"""

from datasette import hookimpl

READ_METHODS = {"GET", "HEAD", "OPTIONS"}
MESSAGE = b"Forbidden: this Datasette is read-only"


@hookimpl
def asgi_wrapper(datasette):
    def wrap(app):
        async def read_only(scope, receive, send):
            if scope["type"] == "http" and scope["method"] not in READ_METHODS and not scope["path"].startswith("/-/"):
                await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": MESSAGE})
                return
            return await app(scope, receive, send)

        return read_only

    return wrap
