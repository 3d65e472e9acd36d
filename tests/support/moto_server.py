"""moto in server mode (real HTTP) as the local stand-in for S3 and SQS.

``moto_endpoint()`` starts one server per process, on a free port, and returns its
URL. ``aws_backend_env(name)`` creates a bucket, a jobs queue and its dead-letter
queue and returns the environment the service needs to run on the aws backend.

moto checks an S3 write's precondition (``If-Match`` / ``If-None-Match``) and then
writes, in two steps without a lock; real S3 does both atomically. The server
therefore serialises S3 writes (PUT/POST/DELETE that are not SQS calls) behind
one lock, so races are judged against S3's semantics and not moto's gap. Reads
and SQS calls (including long polls) stay concurrent.

Run ``python -m tests.support.moto_server [port]`` to serve it on its own, e.g.
to try the aws backend by hand (see the README).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import boto3
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

REGION = "us-east-1"
TEST_MAX_RECEIVE_COUNT = 3
"""The DLQ threshold in tests; matches ``JOB_MAX_ATTEMPTS`` in the env below."""

_lock = threading.Lock()
_server: BaseWSGIServer | None = None
_endpoint: str | None = None

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _AtomicS3Writes:
    """WSGI middleware: one S3 write at a time, so conditional writes are atomic."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app
        self.write_lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method = environ.get("REQUEST_METHOD", "GET")
        # SigV4: "... Credential=<key>/<date>/<region>/<service>/aws4_request, ..."
        scope = environ.get("HTTP_AUTHORIZATION", "").split("/")
        service = scope[3] if len(scope) > 4 else ""
        if method in ("PUT", "POST", "DELETE") and service == "s3":
            with self.write_lock:
                # Consume the body inside the lock: werkzeug may stream it lazily.
                return list(self.app(environ, start_response))
        return self.app(environ, start_response)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start(port: int) -> BaseWSGIServer:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    app = _AtomicS3Writes(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, name="moto-server", daemon=True).start()
    return server


def moto_endpoint() -> str:
    """The URL of this process's moto server, started on first use."""
    global _server, _endpoint
    with _lock:
        if _endpoint is None:
            _server = _start(_free_port())
            _endpoint = f"http://127.0.0.1:{_server.server_port}"
        return _endpoint


def aws_backend_env(
    name: str,
    *,
    max_receive_count: int = TEST_MAX_RECEIVE_COUNT,
    visibility_timeout_s: int = 30,
    endpoint: str | None = None,
) -> dict[str, str]:
    """Create bucket ``<name>-store``, queue ``<name>-jobs`` and DLQ ``<name>-dlq``
    (redrive after ``max_receive_count`` receives) and return the service's env; on
    this process's moto server, or on the one at ``endpoint``.

    ``name`` must be unique per test (lower-case letters, digits and dashes)."""
    endpoint = endpoint or moto_endpoint()
    bucket = f"{name}-store"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    sqs = boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sqs.create_queue(
        QueueName=f"{name}-jobs",
        Attributes={
            "VisibilityTimeout": str(visibility_timeout_s),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
            ),
        },
    )
    return {
        "JOBS_QUEUE_URL": f"sqs://{name}-jobs",
        "JOBS_STORE_URL": f"s3://{bucket}/jobq",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "JOB_MAX_ATTEMPTS": str(max_receive_count),
    }


def main(argv: list[str]) -> None:
    """Serve moto on ``argv[0]`` (default 5000) and create the ``jobq`` resources."""
    global _server, _endpoint
    port = int(argv[0]) if argv else 5000
    _server = _start(port)
    _endpoint = f"http://127.0.0.1:{port}"
    env = aws_backend_env("jobq", visibility_timeout_s=60)
    print(f"# moto serves S3 and SQS on {_endpoint}; eval this output in a shell", flush=True)
    for key, value in env.items():
        print(f"export {key}={value}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
