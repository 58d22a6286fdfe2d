"""Redis clients: `connect()` is the one way every process opens one (`connect_cfg` with the run's `redis`
section). Each network call gets a timeout, replies stay bytes (the stream queue's payloads are msgpack), and
calls that fail on a lost connection are retried with jittered backoff for `redis.retry_s`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING

import redis
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.connection import Encoder, PythonRespSerializer
from redis.retry import Retry

if TYPE_CHECKING:
    from services.config import RedisConfig

log = logging.getLogger("orz.redis")


class _DeadlineRetry(Retry):
    """Retries a call that failed on a lost connection (Redis restarting, a network blip) with jittered
    exponential backoff until `retry_s` have passed, then raises. A refused password or ACL, or a server
    certificate the configured CA did not sign, is not retried: waiting cannot fix it, and the operator should
    see it at once."""

    RETRIED = (redis.ConnectionError, redis.TimeoutError, socket.timeout)

    def __init__(self, retry_s: float, cap_s: float = 2.0, base_s: float = 0.05) -> None:
        super().__init__(NoBackoff(), retries=-1, supported_errors=self.RETRIED)
        # Our own backoff and error set: the policy reads none of redis-py's private attributes, it only
        # implements the public `call_with_retry` every client call goes through.
        self.backoff_policy = EqualJitterBackoff(cap=cap_s, base=base_s)
        self.retry_s = retry_s

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # noqa: ANN001, ANN201
        self.backoff_policy.reset()
        failures = 0
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                result = do()
            except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError):
                raise
            except redis.ConnectionError as error:
                if isinstance(error.__context__, ssl.SSLCertVerificationError):  # a wrong CA: waiting cannot fix it
                    raise redis.ConnectionError(f"TLS: {error.__context__}") from error
                failures = self._failed(error, failures, deadline, fail, is_retryable, with_failure_count)
            except self.RETRIED as error:
                failures = self._failed(error, failures, deadline, fail, is_retryable, with_failure_count)
            else:
                if failures:
                    log.info("Redis reachable again after %d failed attempt(s)", failures)
                return result

    def _failed(self, error, failures, deadline, fail, is_retryable, with_failure_count) -> int:  # noqa: ANN001
        """Counts a failed attempt and sleeps before the next; re-raises once `retry_s` is spent."""
        if is_retryable and not is_retryable(error):
            raise error
        failures += 1
        if with_failure_count:
            fail(error, failures)
        else:
            fail(error)
        if time.monotonic() >= deadline:
            if self.retry_s:
                log.error("Redis unreachable for %.0f s (%s); giving up", self.retry_s, error)
            raise error
        if failures == 1:
            log.warning("Redis call failed (%s: %s); retrying with backoff for up to %.0f s",
                        type(error).__name__, error.__context__ or error, self.retry_s)
        time.sleep(min(self.backoff_policy.compute(failures), max(0.0, deadline - time.monotonic())))
        return failures


# Commands are packed by redis-py's pure-Python serializer, which hands a large argument (a group's arrays) to
# `sendall` as it lies; with hiredis installed redis-py would otherwise copy every argument twice (bytes(),
# then hiredis.pack_command) before sending. Replies are still parsed by hiredis. Reads take 1 MB at a time,
# not 64 KB: a ~1 MB group is one recv, not sixteen (bench/transport.py).
ZERO_COPY_PACKER = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
SOCKET_READ_SIZE = 2**20


def connect(url: str, socket_timeout_s: float = 10.0, *, username: str | None = None,
            password: str | None = None, tls: bool = False, tls_ca_file: str | None = None,
            tls_cert_file: str | None = None, tls_key_file: str | None = None,
            retry_s: float = 0.0) -> redis.Redis:
    """A client whose every call is bounded by `socket_timeout_s`, so a dead Redis fails loudly, never hangs.

    Replies are bytes (`decode_responses=False`): queue payloads are binary msgpack. Blocking reads such as
    XREADGROUP BLOCK must block for less than `socket_timeout_s`, or the socket times out first.
    `username`/`password` authenticate as an ACL user (they override any in the URL); `tls` (or a
    `rediss://` URL) encrypts the connection, verified against `tls_ca_file`, with a client certificate
    when the server asks for one. `retry_s` > 0 retries calls that fail on a lost connection for that long
    (`_DeadlineRetry`): a retried write may then be applied twice, which the queues' at-least-once
    delivery already allows for (duplicates carry their `task_id`).
    """
    if socket_timeout_s <= 0:
        raise ValueError(f"socket_timeout_s must be > 0, got {socket_timeout_s}")
    kwargs: dict = {"socket_timeout": socket_timeout_s, "socket_connect_timeout": socket_timeout_s,
                    "decode_responses": False, "command_packer": ZERO_COPY_PACKER,
                    "socket_read_size": SOCKET_READ_SIZE}
    if username is not None:
        kwargs["username"] = username
    if password is not None:
        kwargs["password"] = password
    if tls and url.startswith("redis://"):
        url = "rediss://" + url.removeprefix("redis://")
    if url.startswith("rediss://"):
        kwargs.update(ssl_ca_certs=tls_ca_file, ssl_certfile=tls_cert_file, ssl_keyfile=tls_key_file,
                      ssl_cert_reqs="required")
    if retry_s > 0:
        kwargs["retry"] = _DeadlineRetry(retry_s)
    else:
        kwargs["retry"] = Retry(NoBackoff(), 0)
    return redis.Redis.from_url(url, **kwargs)


def connect_cfg(rc: RedisConfig) -> redis.Redis:
    """The client every process uses: `connect()` with the run's `redis` section (URL, ACL user, TLS, retry)."""
    if rc.url is None:
        raise ValueError("redis.url is not set (ORZ__REDIS__URL): point the process at the run's Redis")
    return connect(rc.url, rc.socket_timeout_s, username=rc.username, password=rc.password, tls=rc.tls,
                   tls_ca_file=rc.tls_ca_file, tls_cert_file=rc.tls_cert_file, tls_key_file=rc.tls_key_file,
                   retry_s=rc.retry_s)
