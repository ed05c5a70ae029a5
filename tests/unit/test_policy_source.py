"""The policy directory at start and at hot reload: a set that cannot be loaded never means "no
policies" — before any set is in force every decision denies and every workload is STRICT; after one
is, a broken change (or a vanished directory) keeps it."""

from __future__ import annotations

import os

from agent.policy.engine import Request
from agent.policy.model import MtlsMode
from agent.policy.source import PolicySource

ALLOW_WEB = """\
kind: AuthorizationPolicy
metadata: {name: only-web, namespace: data}
spec:
  selector: {workload: db}
  action: ALLOW
  rules: [{from: [{principals: ["spiffe://td/ns/shop/sa/web"]}]}]
"""
TYPO = "kind: AuthorizationPolicy\nmetadata: {name: typo, namespace: data}\nspec:\n  action: DENNY\n"
WEB = Request("spiffe://td/ns/shop/sa/web", "shop", "db", "data", 5432)
OTHER = Request("spiffe://td/ns/shop/sa/other", "shop", "db", "data", 5432)


def test_an_invalid_file_at_start_denies_everything_and_names_file_line_field(tmp_path):
    (tmp_path / "typo.yaml").write_text(TYPO)
    source = PolicySource(str(tmp_path))
    assert source.reload() is False
    assert not source.in_force and source.load_errors == 1
    assert source.last_error == f"{tmp_path}/typo.yaml:4: spec.action: 'DENNY' is not ALLOW, DENY or AUDIT"
    decision = source.decide(OTHER)
    assert not decision.allowed and "typo.yaml:4: spec.action" in decision.reason
    assert source.mtls_mode("data", "anything") is MtlsMode.STRICT
    (tmp_path / "typo.yaml").unlink()
    assert source.reload() is True and source.in_force
    assert source.decide(OTHER).allowed and source.mtls_mode("data", "db") is MtlsMode.PERMISSIVE


def test_a_missing_directory_at_start_is_an_error_until_it_exists(tmp_path):
    directory = tmp_path / "policies"
    source = PolicySource(str(directory))
    assert source.reload() is False and not source.in_force
    assert source.last_error.startswith(f"{directory}:0: policy.dir: does not exist: create it")
    assert not source.decide(WEB).allowed
    directory.mkdir()  # an empty directory: no policies, default_action decides
    assert source.reload() is True and source.decide(WEB).allowed


def test_a_file_in_place_of_the_directory_is_an_error(tmp_path):
    (tmp_path / "policies").write_text("not a directory")
    source = PolicySource(str(tmp_path / "policies"))
    assert source.reload() is False
    assert "policy.dir: is not a directory" in source.last_error


def test_once_in_force_a_broken_change_or_a_vanished_directory_keeps_the_set(tmp_path):
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "allow.yaml").write_text(ALLOW_WEB)
    source = PolicySource(str(directory))
    assert source.reload() is True
    assert source.decide(WEB).allowed and not source.decide(OTHER).allowed
    (directory / "typo.yaml").write_text(TYPO)
    assert source.reload() is False and source.load_errors == 1
    assert not source.decide(OTHER).allowed, "a broken change must keep the previous set"
    os.rename(directory, tmp_path / "moved")
    assert source.reload() is False and source.load_errors == 2
    assert "does not exist" in source.last_error
    assert not source.decide(OTHER).allowed, "a vanished directory is not an empty set"


def test_a_refused_change_names_its_error_and_the_valid_edits_it_holds_back(tmp_path):
    (tmp_path / "allow.yaml").write_text(ALLOW_WEB)
    (tmp_path / "gone.yaml").write_text(ALLOW_WEB.replace("only-web", "gone"))
    clock = iter([100.0, 200.0, 300.0]).__next__
    source = PolicySource(str(tmp_path), clock=clock)
    assert source.reload() is True and source.loaded_at == 100.0 and source.refused is None
    (tmp_path / "allow.yaml").write_text(ALLOW_WEB.replace("shop/sa/web", "shop/sa/other"))  # valid edit
    (tmp_path / "gone.yaml").unlink()                                                         # valid removal
    (tmp_path / "typo.yaml").write_text(TYPO)
    assert source.reload() is False
    refused = source.refused
    assert (refused.file, refused.line, refused.field, refused.at) == (f"{tmp_path}/typo.yaml", 4, "spec.action", 200.0)
    assert refused.problem == "'DENNY' is not ALLOW, DENY or AUDIT"
    assert refused.held_back == (f"{tmp_path}/allow.yaml", f"{tmp_path}/gone.yaml")
    assert [(f.change, bool(f.error)) for f in refused.files] == [("changed", False), ("removed", False), ("added", True)]
    assert source.decide(WEB).allowed, "the held-back edit is not in force"
    (tmp_path / "typo.yaml").unlink()
    assert source.reload() is True and source.refused is None and source.loaded_at == 300.0
    assert not source.decide(WEB).allowed
