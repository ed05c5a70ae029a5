"""Root rotation with overlap, on node CA directories: each step's files, the order it enforces, and
— at every step and in every mix of nodes that have and have not applied it — a real mTLS handshake
between two nodes' stores. Also the CLI that drives it, and the agent-convergence checks."""

from __future__ import annotations

import itertools

import pytest
from cryptography import x509
from click.testing import CliRunner

from agent.cli import main
from agent.identity import root_rotation
from agent.identity.bundle import fingerprint
from agent.identity.ca import init_ca, load_ca
from agent.identity.errors import CaError
from agent.identity.node_ca import issue_node_files, load_node_ca
from agent.identity.spiffe import SpiffeId
from agent.identity.store import IdentityStore
from tests.unit.test_identity_tls import handshake

TD = "rot.test"
WEB = SpiffeId.parse("spiffe://rot.test/ns/shop/sa/web")
DB = SpiffeId.parse("spiffe://rot.test/ns/data/sa/postgres")


@pytest.fixture
def cluster(tmp_path):
    init_ca(TD, tmp_path / "old")
    dirs = [tmp_path / "node1", tmp_path / "node2"]
    for i, d in enumerate(dirs, 1):
        issue_node_files(tmp_path / "old", f"node{i}", d)
    return tmp_path / "old", tmp_path / "new", dirs


def store_of(node_dir, spiffe_id) -> IdentityStore:
    signing = load_node_ca(node_dir)
    store = IdentityStore(signing.ca, signing.bundle.pem, 3600)
    store.ensure([spiffe_id])
    return store


def talks(client_dir, server_dir) -> bool:
    client, server = store_of(client_dir, WEB), store_of(server_dir, DB)
    result = handshake(client.client_context_for(WEB), server.server_context, DB.sni)
    return result.established


def test_every_step_keeps_every_pair_of_nodes_talking(cluster) -> None:
    """After each step on one node (the mixed state) and then on both, both directions handshake."""
    old, new, (n1, n2) = cluster
    assert talks(n1, n2) and talks(n2, n1)
    for step in (root_rotation.add_root, root_rotation.reissue, root_rotation.remove_old):
        step(new, [n1])
        assert talks(n1, n2) and talks(n2, n1), f"{step.__name__} applied on node1 only"
        step(new, [n1, n2])
        assert talks(n1, n2) and talks(n2, n1), f"{step.__name__} applied on both nodes"
    new_fp = fingerprint(load_ca(new).certificate)
    _, states = root_rotation.status(new, [n1, n2])
    assert all(s.bundle == (new_fp,) and s.issuer == new_fp for s in states)
    # the old root is now useless: a node still on it is refused
    issue_node_files(old, "node3", n1.parent / "node3")
    assert not talks(n1.parent / "node3", n2)


def test_add_root_creates_the_new_root_once_and_is_idempotent(cluster) -> None:
    old, new, dirs = cluster
    lines = root_rotation.add_root(new, dirs)
    assert any("created the new root CA for rot.test" in line for line in lines)
    again = root_rotation.add_root(new, dirs)
    assert all("already holds the new root" in line for line in again)
    assert load_ca(new).trust_domain == TD
    for d in dirs:
        assert len(load_node_ca(d).bundle.roots) == 2


def test_steps_refuse_to_run_out_of_order(cluster) -> None:
    old, new, dirs = cluster
    init_ca(TD, new)
    with pytest.raises(CaError, match="do not hold the new root yet.*add-root"):
        root_rotation.reissue(new, dirs)
    root_rotation.add_root(new, dirs[:1])
    with pytest.raises(CaError, match="bundles of node2 do not hold the new root"):
        root_rotation.reissue(new, dirs)
    root_rotation.add_root(new, dirs)
    with pytest.raises(CaError, match="intermediates of node1, node2 do not come from the new root.*reissue"):
        root_rotation.remove_old(new, dirs)
    with pytest.raises(CaError, match="--node-dir"):
        root_rotation.add_root(new, [])


def test_add_root_refuses_a_new_root_of_another_trust_domain(cluster) -> None:
    old, new, dirs = cluster
    init_ca("elsewhere", new)
    with pytest.raises(CaError, match="trust domain 'elsewhere'.*keeps the trust domain"):
        root_rotation.add_root(new, dirs)


def _report(bundle, node_root, identity_roots):
    return {"trust_bundle": [{"fingerprint": fp} for fp in bundle],
            "node_ca": {"root": {"fingerprint": node_root}},
            "identities": [{"spiffe_id": f"spiffe://x/ns/a/sa/{i}", "root": {"fingerprint": fp}}
                           for i, fp in enumerate(identity_roots)]}


def test_converged_reads_each_steps_evidence_from_the_agent_report() -> None:
    old, new = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert root_rotation.converged("add-root", _report([old], old, [old]), new) == "its bundle is [aaaaaaaaaaaa]"
    assert root_rotation.converged("add-root", _report([old, new], old, [old]), new) is None
    assert "chains to aaaaaaaaaaaa" in root_rotation.converged("reissue", _report([old, new], old, [old]), new)
    assert "spiffe://x/ns/a/sa/1 still chain" in root_rotation.converged("reissue", _report([old, new], new, [new, old]), new)
    assert root_rotation.converged("reissue", _report([old, new], new, [new, new]), new) is None
    assert root_rotation.converged("remove-old", _report([old, new], new, [new]), new) is not None
    assert root_rotation.converged("remove-old", _report([new], new, [new]), new) is None


def test_wait_for_agents_polls_until_all_converge_and_names_laggards() -> None:
    new = "sha256:" + "b" * 64
    answers = {"http://a": itertools.chain([_report([], None, [])], itertools.repeat(_report([new], new, []))),
               "http://b": itertools.repeat(_report([new], new, []))}
    calls = []
    root_rotation.wait_for_agents("add-root", new, answers, lambda url: calls.append(url) or next(answers[url]),
                             timeout=5, sleep=lambda s: None)
    assert calls.count("http://a") == 2
    clock = itertools.count()

    def unreachable(url):
        raise OSError("connection refused")

    with pytest.raises(CaError, match=r"http://a: cannot read its /debug/certs: connection refused"):
        root_rotation.wait_for_agents("add-root", new, ["http://a"], unreachable, timeout=3, sleep=lambda s: None,
                                 monotonic=lambda: next(clock))


def test_cli_issues_roots_and_nodes_and_drives_the_rotation(tmp_path) -> None:
    runner = CliRunner()
    root, new = tmp_path / "root", tmp_path / "new"
    out = runner.invoke(main, ["ca", "init", "--trust-domain", TD, "--out", str(root)])
    assert out.exit_code == 0 and "next: tcpmesh ca issue-node" in out.output, out.output
    nodes = []
    for name in ("node1", "node2"):
        out = runner.invoke(main, ["ca", "issue-node", name, "--ca", str(root), "--out", str(tmp_path / name)])
        assert out.exit_code == 0 and f"issued node CA for {name}" in out.output, out.output
        nodes += ["--node-dir", str(tmp_path / name)]
    out = runner.invoke(main, ["ca", "rotate"])
    assert out.exit_code == 0 and "add-root" in out.output and "reissue" in out.output and "remove-old" in out.output
    out = runner.invoke(main, ["ca", "rotate", "reissue", "--new-ca", str(new), *nodes])
    assert out.exit_code == 2 and "does not exist" in out.output  # no new root yet
    for step, words in (("add-root", "next: tcpmesh ca rotate reissue"), ("reissue", "next: tcpmesh ca rotate remove-old"),
                        ("remove-old", "rotation complete")):
        out = runner.invoke(main, ["ca", "rotate", step, "--new-ca", str(new), *nodes])
        assert out.exit_code == 0 and words in out.output, out.output
    out = runner.invoke(main, ["ca", "rotate", "status", "--new-ca", str(new), *nodes])
    assert out.exit_code == 0 and out.output.count("steps done: add-root, reissue, remove-old") == 2, out.output
    out = runner.invoke(main, ["ca", "issue-node", "node1", "--ca", str(root), "--out", str(tmp_path / "node1")])
    assert out.exit_code == 2 and "does not contain the root" in out.output  # the old root is gone from the bundle


def test_cli_waits_for_agents_it_cannot_reach_and_says_so(tmp_path) -> None:
    init_ca(TD, tmp_path / "root")
    issue_node_files(tmp_path / "root", "node1", tmp_path / "node1")
    out = CliRunner().invoke(main, ["ca", "rotate", "add-root", "--new-ca", str(tmp_path / "new"), "--node-dir",
                                    str(tmp_path / "node1"), "--wait-admin", "http://127.0.0.1:9", "--timeout", "0.5"])
    assert out.exit_code == 2 and "have not applied add-root" in out.output and "127.0.0.1:9" in out.output


# -- issuer mode: the issuer's directory and the nodes' credential directories -------------------

@pytest.fixture
def issuer_cluster(tmp_path):
    """A migrating cluster: node1 on a node intermediate, node2 in issuer mode (a credential directory), and
    the issuer's directory."""
    from agent.identity.issuer_ca import issue_issuer_files
    from agent.identity.issuer_ca import issue_node_credential

    init_ca(TD, tmp_path / "old")
    issue_node_files(tmp_path / "old", "node1", tmp_path / "node1")
    issue_node_credential(tmp_path / "old", "node2", tmp_path / "cred2")
    issue_issuer_files(tmp_path / "old", tmp_path / "issuer")
    return tmp_path / "old", tmp_path / "new", [tmp_path / "node1", tmp_path / "cred2", tmp_path / "issuer"]


def test_issuer_mode_rotation_reissues_the_issuer_first_then_puts_the_new_root_first_on_nodes(issuer_cluster):
    old_dir, new_dir, dirs = issuer_cluster
    kinds = [root_rotation.dir_kind(d) for d in dirs]
    assert kinds == [root_rotation.KIND_NODE_CA, root_rotation.KIND_CREDENTIAL, root_rotation.KIND_ISSUER]
    with pytest.raises(CaError, match="pass the issuer's directory"):
        root_rotation.add_root(new_dir, dirs[:2])
    root_rotation.add_root(new_dir, dirs)
    old, new = fingerprint(load_ca(old_dir).certificate), fingerprint(load_ca(new_dir).certificate)
    assert all(root_rotation.read_node_dir(d)[0].bundle == (old, new) for d in dirs)
    with pytest.raises(CaError, match="reissue"):
        root_rotation.remove_old(new_dir, dirs)
    order = []

    def wait_issuers(fp):  # called after the issuer's directory is written, before any node's
        issuer_state = root_rotation.read_node_dir(dirs[2])[0]
        order.append((fp, issuer_state.issuer, root_rotation.read_node_dir(dirs[1])[0].bundle))
        return ["waited"]

    lines = root_rotation.reissue(new_dir, dirs, wait_issuers=wait_issuers)
    assert "waited" in lines
    assert order == [(new, new, (old, new))]               # the issuer signed under new; node2 not yet told
    states = [root_rotation.read_node_dir(d)[0] for d in dirs]
    assert all(root_rotation.step_done(root_rotation.REISSUE, s, new) for s in states)
    assert states[1].bundle == (new, old) and states[2].bundle == (new, old)   # the new root first
    assert root_rotation.reissue(new_dir, dirs, wait_issuers=wait_issuers)     # safe to repeat
    root_rotation.remove_old(new_dir, dirs)
    assert all(root_rotation.read_node_dir(d)[0].bundle == (new,) for d in dirs)
    # the issuer's directory remembers what left its bundle (a replica started later refuses such nodes by name);
    # node directories get no such file
    removed = dirs[2] / "removed-roots.pem"
    assert [fingerprint(r) for r in x509.load_pem_x509_certificates(removed.read_bytes())] == [old]
    assert not (dirs[1] / "removed-roots.pem").exists() and not (dirs[0] / "removed-roots.pem").exists()
    root_rotation.remove_old(new_dir, dirs)                                     # safe to repeat
    assert [fingerprint(r) for r in x509.load_pem_x509_certificates(removed.read_bytes())] == [old]
