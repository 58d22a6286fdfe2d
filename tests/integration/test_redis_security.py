"""Redis access control and TLS, against a real redis-server: every process connects through `connect_cfg`
with the `redis` section's ACL user, password and TLS files. A wrong password fails at once with a clear
error (it is not retried like a lost connection); an ACL user confined to the run's namespace cannot touch
other keys; a TLS port refuses plain and uncertified clients and serves a client with the right certificate."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis

from services.config_io import load_config
from services.control import ControlPlane, Heartbeat, Keys
from services.protocol import PromptTask, SamplingParams
from services.queue import prompt_queue
from services.redis_client import connect_cfg
from services.redis_server import EmbeddedRedis, free_port


def _cfg(**redis_section):
    return load_config(environ={}, overrides={"redis": redis_section}).redis


# The rule deploy/ gives the `orz` user (docker-compose.yml, deploy/k8s/base/redis.yaml): the run's keys and
# channels only, no administration, no flushing.
ACL = ["--user", "default", "off", "--user", "orz", "on", ">s3cret", "~orz:*", "&orz:*", "+@all", "-@admin",
       "-flushall", "-flushdb"]


def test_acl_user_and_password() -> None:
    with EmbeddedRedis(extra_args=ACL) as server:
        client = connect_cfg(_cfg(url=server.url, username="orz", password="s3cret", retry_s=30))
        keys = Keys("orz:secure")
        queue = prompt_queue(client, keys)
        queue.ensure_group()
        task = PromptTask("t0", "1+1=", "2", "math", 2, SamplingParams(), 0, (1, 2, 3))
        queue.add(task)
        assert queue.read("g0", 1)[0][1] == task
        # every other kind of call the learner and generators make is allowed under that rule
        assert client.info("server")["run_id"] and client.info("memory")["used_memory"] > 0
        assert client.xinfo_groups(keys.prompts)[0]["pending"] == 1
        control = ControlPlane(client, keys)
        control.beat("g0", Heartbeat(time.time(), 0, 1, "h", time.time(), 0.0))
        control.set_policy_version(3)
        assert set(control.heartbeats()) == {"g0"} and control.policy_version() == 3
        assert queue.reclaim("g1", 0, 10)[0][1] == task
        queue.ack([queue.read("g1", 1)[0][0]] if queue.backlog() else [])
        client.xtrim(keys.prompts, minid="0-1")
        with pytest.raises(redis.ResponseError, match="no permissions"):  # outside the run's namespace
            client.set("someone-elses-key", "x")
        with pytest.raises(redis.ResponseError, match="no permissions"):  # no flushing
            client.flushall()
        with pytest.raises(redis.ResponseError, match="no permissions"):  # no administration
            client.config_set("appendonly", "no")

        t0 = time.monotonic()
        with pytest.raises(redis.AuthenticationError):
            connect_cfg(_cfg(url=server.url, username="orz", password="wrong", retry_s=30)).ping()
        assert time.monotonic() - t0 < 5  # refused at once, not retried for retry_s
        with pytest.raises(redis.AuthenticationError):
            connect_cfg(_cfg(url=server.url, retry_s=30)).ping()  # no credentials: the default user is off


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates(d: Path) -> None:
    """A CA, and a server and a client certificate it signed (the server's for 127.0.0.1)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=orz-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext", cwd=d)


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    _certificates(tmp_path)
    tls_port = free_port()
    args = ["--tls-port", str(tls_port), "--tls-cert-file", str(tmp_path / "server.crt"),
            "--tls-key-file", str(tmp_path / "server.key"), "--tls-ca-cert-file", str(tmp_path / "ca.crt"),
            "--tls-auth-clients", "yes"]
    with EmbeddedRedis(extra_args=args):
        url = f"redis://127.0.0.1:{tls_port}/0"
        ca, cert, key = (str(tmp_path / f) for f in ("ca.crt", "client.crt", "client.key"))
        client = connect_cfg(_cfg(url=url, tls=True, tls_ca_file=ca, tls_cert_file=cert, tls_key_file=key))
        assert client.ping()
        assert client.connection_pool.connection_kwargs.get("ssl_ca_certs") == ca
        client.set("orz:k", b"v")
        assert client.get("orz:k") == b"v"
        # the same, as a rediss:// URL
        again = connect_cfg(_cfg(url=f"rediss://127.0.0.1:{tls_port}/0", tls_ca_file=ca, tls_cert_file=cert,
                                 tls_key_file=key))
        assert again.get("orz:k") == b"v"
        with pytest.raises(redis.ConnectionError):  # no client certificate: the server refuses the handshake
            connect_cfg(_cfg(url=url, tls=True, tls_ca_file=ca, retry_s=0)).ping()
        t0 = time.monotonic()
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):  # a CA that did not sign it
            connect_cfg(_cfg(url=url, tls=True, tls_ca_file=str(tmp_path / "client.crt"), tls_cert_file=cert,
                             tls_key_file=key, retry_s=30)).ping()
        assert time.monotonic() - t0 < 5  # refused at once, not retried for retry_s
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):  # plain text to the TLS port
            connect_cfg(_cfg(url=url, socket_timeout_s=2, retry_s=0)).ping()
