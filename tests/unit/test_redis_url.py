"""Redis URLs parsed and shown without credentials (rediss:// against a real TLS redis-server:
tests/integration/test_redis_url.py)."""

import pytest

from circles.backend.redis_url import InvalidRedisURL, RedisAddress, parse_redis_url, redact_url
from circles.server.config import Config


@pytest.mark.parametrize("url, expected", [
    ("redis://localhost", RedisAddress(host="localhost")),
    ("redis://10.0.0.5:6380/3", RedisAddress(host="10.0.0.5", port=6380, db=3)),
    ("redis://:s3cret@h:1/0", RedisAddress(host="h", port=1, password="s3cret")),
    ("redis://alice:p%40ss@h/2", RedisAddress(host="h", db=2, username="alice", password="p@ss")),
    ("redis://[::1]:7000", RedisAddress(host="::1", port=7000)),
    ("redis://h?db=4", RedisAddress(host="h", db=4)),
    ("rediss://redis.example.com:6380/1", RedisAddress(host="redis.example.com", port=6380, db=1, tls=True)),
    ("rediss://h?ssl_ca_certs=/etc/ca.pem", RedisAddress(host="h", tls=True, ca_certs="/etc/ca.pem")),
    ("unix:///run/redis.sock", RedisAddress(path="/run/redis.sock")),
    ("unix:///run/redis.sock?db=5&password=pw", RedisAddress(path="/run/redis.sock", db=5, password="pw")),
    ("unix://bob:pw@/run/redis.sock", RedisAddress(path="/run/redis.sock", username="bob", password="pw")),
    ("redis+sentinel://s1:26379,s2:26380,s3/mymaster/2",
     RedisAddress(sentinels=(("s1", 26379), ("s2", 26380), ("s3", 26379)), master="mymaster", db=2)),
    ("redis+sentinel://s1/mymaster", RedisAddress(sentinels=(("s1", 26379),), master="mymaster")),
    ("redis+sentinel://alice:p%40ss@[::1]:7000,10.0.0.2/m/0?sentinel_password=sp",
     RedisAddress(sentinels=(("::1", 7000), ("10.0.0.2", 26379)), master="m", username="alice", password="p@ss",
                  sentinel_password="sp")),
    ("REDIS+SENTINEL://:pw@s1/m", RedisAddress(sentinels=(("s1", 26379),), master="m", password="pw")),
])
def test_parse(url, expected):
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize("url", [
    "http://h", "redis://", "redis://h:notaport", "redis://h/x", "redis://h/-1", "unix://relative.sock",
    "redis://h?color=red", "redis://h?ssl_ca_certs=/ca.pem", "", "localhost:6379",
    "redis+sentinel://s1", "redis+sentinel://s1/", "redis+sentinel:///m", "redis+sentinel://s1,,s2/m",
    "redis+sentinel://s1:x/m", "redis+sentinel://s1:99999/m", "redis+sentinel://s1/m/x", "redis+sentinel://s1/m/0/1",
    "redis+sentinel://s1/m?db=1",
])
def test_invalid(url):
    with pytest.raises(InvalidRedisURL):
        parse_redis_url(url)


def test_password_never_shown():
    address = parse_redis_url("rediss://u:hunter2@h:1/2")
    assert address.redacted() == "rediss://u:***@h:1/2"
    assert "hunter2" not in repr(address)
    assert "hunter2" not in repr(Config(redis_url="redis://:hunter2@h/0"))
    assert redact_url("unix:///s.sock?password=hunter2") == "unix://:***@/s.sock?db=0"
    assert redact_url("nonsense://hunter2") == "<invalid redis url>"
    sentinel = parse_redis_url("redis+sentinel://u:hunter2@s1,s2:26380/m/1?sentinel_password=hunter3")
    assert sentinel.redacted() == "redis+sentinel://u:***@s1:26379,s2:26380/m/1?sentinel_password=***"
    assert sentinel.where() == "redis+sentinel://s1:26379,s2:26380/m/1"
    assert "hunter" not in repr(sentinel)


def test_config_rejects_bad_url():
    with pytest.raises(ValueError):
        Config(redis_url="http://h")


def test_a_ca_file_that_cannot_be_used_is_a_clear_error(tmp_path):
    from twisted.internet import reactor

    from circles.common.tls_client import CAFileError, load_ca_file

    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(CAFileError, match="^no PEM certificate in '.*not.pem'$"):
        load_ca_file(str(not_pem))
    with pytest.raises(CAFileError, match="^cannot read CA file '.*missing.pem': No such file or directory$"):
        load_ca_file(str(tmp_path / "missing.pem"))
    address = parse_redis_url(f"rediss://localhost?ssl_ca_certs={tmp_path / 'missing.pem'}")
    with pytest.raises(InvalidRedisURL, match="^ssl_ca_certs: cannot read CA file"):
        address.endpoint(reactor)


def test_where_names_the_server_without_credentials():
    assert parse_redis_url("redis://u:pw@h:1/2").where() == "redis://h:1/2"
    assert parse_redis_url("rediss://:pw@[::1]").where() == "rediss://[::1]:6379/0"
    assert parse_redis_url("unix:///run/redis.sock?password=pw").where() == "unix:///run/redis.sock"
    assert parse_redis_url("unix:///run/redis.sock?db=3").where() == "unix:///run/redis.sock?db=3"
