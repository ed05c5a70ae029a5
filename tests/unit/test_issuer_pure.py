"""The issuer's pure parts: placement, per-node rate limits, bootstrap tokens and the spent-token ledger,
and the config's errors. Placement was seen failing with its node check removed (node1 allowed b)."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from agent.issuer.config import issuer_config_from_mapping
from agent.issuer.placement import authorize
from agent.issuer.ratelimit import RateLimiter
from agent.issuer.tokens import Claim, SpentLedger, TokenRefused, make_token, verify_token
from agent.registry.model import Node, Registry, Workload

TD = "t.test"
REG = Registry.build(TD, [Node("node1", "10.0.0.1"), Node("node2", "10.0.0.2")],
                     [Workload("a-1", "shop", "a", "10.1.0.1", "node1", trust_domain=TD),
                      Workload("b-1", "shop", "b", "10.2.0.1", "node2", trust_domain=TD)])


@pytest.mark.parametrize("node,uri,reason", [
    ("node1", f"spiffe://{TD}/ns/shop/sa/a", None),
    ("node1", f"spiffe://{TD}/ns/shop/sa/b", "not_on_node"),
    ("node3", f"spiffe://{TD}/ns/shop/sa/a", "unknown_node"),
    ("node1", "spiffe://other.test/ns/shop/sa/a", "wrong_trust_domain"),
    ("node1", f"spiffe://{TD}/node/node1", "not_a_workload_identity"),
    ("node1", f"spiffe://{TD}/tcpmesh/issuer", "not_a_workload_identity"),
])
def test_placement(node, uri, reason):
    _, why = authorize(REG, node, uri)
    assert (why.reason if why else None) == reason


def test_placement_without_a_registry_refuses():
    assert authorize(None, "node1", f"spiffe://{TD}/ns/shop/sa/a")[1].reason == "no_registry"


def test_rate_limit_is_per_node_and_refills():
    now = [0.0]
    limiter = RateLimiter(rate=2, burst=4, clock=lambda: now[0])
    assert limiter.allow("node1", 4) and not limiter.allow("node1")
    assert limiter.allow("node2", 4)            # another node has its own bucket
    now[0] += 1.0
    assert limiter.allow("node1", 2) and not limiter.allow("node1")


def test_rate_limit_forgets_full_buckets_when_it_holds_too_many():
    now = [0.0]
    limiter = RateLimiter(rate=1, burst=1, clock=lambda: now[0], max_keys=3)
    for key in ("a", "b", "c"):
        assert limiter.allow(key)
    now[0] += 5
    assert limiter.allow("d") and len(limiter._buckets) <= 3


def test_tokens_verify_only_for_their_node_until_expiry_with_the_right_key():
    key = b"k" * 32
    token = make_token(key, "node1", now=1000, ttl_seconds=60)
    claim = verify_token(key, token, "node1", now=1059)
    assert claim.node == "node1" and claim.expires == 1060
    for args, reason in [((key, token, "node2", 1000), "wrong_node"), ((key, token, "node1", 1060), "expired_token"),
                         ((b"x" * 32, token, "node1", 1000), "bad_token"),
                         ((key, token.replace("node1", "node2", 1), "node2", 1000), "bad_token")]:
        with pytest.raises(TokenRefused) as info:
            verify_token(*args)
        assert info.value.reason == reason


def test_the_ledger_admits_each_token_once_and_prunes_expired_claims(tmp_path):
    a, b = SpentLedger(tmp_path), SpentLedger(tmp_path)   # two replicas on one shared directory
    claim = Claim("0" * 32, "node1", expires=2000)
    assert a.claim(claim, now=1000) and not b.claim(claim, now=1001) and not a.claim(claim, now=1002)
    b.claim(Claim("1" * 32, "node1", expires=5000), now=3000)      # pruning runs on every claim
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1" * 32]


@pytest.mark.parametrize("doc,field", [
    ({"trust_domain": "Bad Domain"}, "trust_domain"),
    ({"registry": {"source": "consul"}}, "registry.source"),
    ({"max_svid_ttl_seconds": 5}, "max_svid_ttl_seconds"),
    ({"listen": {"port": 0}}, "listen.port"),
    ({"listen": {"porrt": 1}}, "listen.porrt"),
    ({"limits": {"workers": 0}}, "limits.workers"),
    ({"limits": {"workers": 4, "attestations": 4}}, "limits.attestations"),
    ({"limits": {"max_handshakes_per_address": 0}}, "limits.max_handshakes_per_address"),
    ({"limits": {"max_handshakes": 16, "max_handshakes_per_address": 32}}, "limits.max_handshakes_per_address"),
    ({"limits": {"request_timeout_seconds": 0}}, "limits.request_timeout_seconds"),
    ({"limits": {"max_conections": 5}}, "limits.max_conections"),
])
def test_config_errors_name_the_field(doc, field):
    with pytest.raises(ConfigError) as info:
        issuer_config_from_mapping(doc)
    assert info.value.field == field


@pytest.mark.parametrize("identity,field", [
    ({"mode": "issuerr"}, "identity.mode"),
    ({"mode": "issuer"}, "identity.issuer.addresses"),
    ({"mode": "issuer", "issuer": {"addresses": ["10.0.0.5:15012", "10.0.0.6"]}}, "identity.issuer.addresses[1]"),
    ({"mode": "issuer", "issuer": {"addresses": ["a:1"], "credential_dir": ""}}, "identity.issuer.credential_dir"),
    ({"mode": "issuer", "issuer": {"addresses": "a:1"}}, "identity.issuer.addresses"),
    ({"mode": "issuer", "issuer": {"adresses": ["a:1"]}}, "identity.issuer.adresses"),
])
def test_the_agents_issuer_settings_are_validated_naming_the_field(identity, field):
    from agent.config import config_from_mapping, validate

    with pytest.raises(ConfigError) as info:
        validate(config_from_mapping({"node": {"name": "node1", "address": "10.76.0.1"},
                                      "capture": {"redirect_address": "169.254.1.1"}, "identity": identity}))
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_issuer_mode_validates_without_a_node_ca_dir():
    from agent.config import config_from_mapping, validate

    config = validate(config_from_mapping({"node": {"name": "node1", "address": "10.76.0.1"},
                                           "capture": {"redirect_address": "169.254.1.1"},
                                           "identity": {"mode": "issuer", "node_ca_dir": "",
                                                        "issuer": {"addresses": ["10.0.0.5:15012"]}}}))
    assert config.identity.issuer.addresses == ["10.0.0.5:15012"]


def test_the_issuer_raises_its_open_file_limit_to_what_its_limits_need_or_says_how_to_fix_it():
    from agent.errors import TcpmeshError
    from agent.issuer.config import LimitsConfig
    from agent.issuer.server import descriptors_needed, open_file_soft_limit

    need = descriptors_needed(LimitsConfig())
    assert need == 1024 + 256 + 64
    assert open_file_soft_limit(1024, 524288, need) == need   # systemd's default for a service: soft raised
    assert open_file_soft_limit(65536, 65536, need) == 65536  # enough already: left alone
    with pytest.raises(TcpmeshError, match="LimitNOFILE.*limits.max_connections"):
        open_file_soft_limit(1024, 1024, need)
