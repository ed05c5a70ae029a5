"""`tcpmesh doctor --config`'s readiness lines: a policy.dir that does not load is named with file,
line and field; a running agent's reason (from its admin socket) is passed through; nothing listening is said so."""

from __future__ import annotations

from agent.host import readiness

TYPO = "kind: AuthorizationPolicy\nmetadata: {name: typo, namespace: data}\nspec:\n  action: DENNY\n"


def test_a_policy_dir_that_does_not_load_is_named_and_says_what_it_means(tmp_path):
    (tmp_path / "typo.yaml").write_text(TYPO)
    status = readiness.policy_status(str(tmp_path))
    assert status == {"dir": str(tmp_path), "loads": False,
                      "detail": f"{tmp_path}/typo.yaml:4: spec.action: 'DENNY' is not ALLOW, DENY or AUDIT"}
    lines = readiness.render(status, {"socket": "u", "reachable": False, "ready": False, "detail": "no agent answers"})
    assert lines[0].startswith("policy.dir DOES NOT LOAD: ") and "NOT READY" in lines[1]
    assert lines[2] == "running agent (u): not running: no agent answers"
    missing = readiness.policy_status(str(tmp_path / "nope"))
    assert not missing["loads"] and "policy.dir: does not exist" in missing["detail"]
    (tmp_path / "typo.yaml").unlink()
    assert readiness.policy_status(str(tmp_path))["loads"]


def test_the_running_agents_reason_comes_from_its_admin_socket(tmp_path):
    """A real admin socket server (agent.control.admin_socket) with the composition root's status op."""
    import asyncio

    from agent.control.admin_socket import AdminSocket

    reason = "no policy set is in force: x.yaml:4: spec.action: bad"
    path = str(tmp_path / "agent.sock")

    async def scenario():
        server = AdminSocket(path, workloads=None,
                             ops={"status": lambda request: {"status": {"ready": False, "not_ready_reason": reason}}})
        await server.start()
        try:
            return await asyncio.to_thread(readiness.running_agent, path)
        finally:
            await server.stop()

    agent = asyncio.run(scenario())
    assert agent == {"socket": path, "reachable": True, "ready": False, "detail": f"not ready: {reason}"}
    gone = readiness.running_agent(path)
    assert not gone["reachable"] and gone["detail"].startswith("no agent answers") and path in gone["detail"]


REGISTRY = ("nodes: [{name: node1, address: 10.76.0.1}]\n"
            "workloads:\n"
            "  - {name: web, namespace: shop, service_account: web, ip: 10.77.1.10, node: node1}\n")


def test_a_registry_file_that_does_not_load_is_named_before_the_agent_starts(tmp_path):
    """`tcpmesh doctor --config` checked policy.dir but not registry.file: a duplicate IP in workloads.yaml
    only showed up as a failed start in the journal (seen failing: readiness had no registry_status)."""
    path = tmp_path / "workloads.yaml"
    path.write_text(REGISTRY + "  - {name: db, namespace: shop, service_account: db, ip: 10.77.1.10, node: node1}\n")
    status = readiness.registry_status(str(path), "td.example", "node1")
    assert not status["loads"]
    assert status["detail"] == (f"{path}: workloads[1].ip: duplicate ip: also workloads[0] (shop/web) "
                                f"(got '10.77.1.10'); each ip may appear only once in workloads: change or "
                                f"remove one of the two")
    lines = readiness.render_registry(status)
    assert lines[0].startswith("registry.file DOES NOT LOAD: ") and "refuses to start" in lines[1]
    path.write_text(REGISTRY)
    assert readiness.registry_status(str(path), "td.example", "node1") == {
        "file": str(path), "loads": True, "detail": "1 node, 1 workload, 1 on node1"}
    other = readiness.registry_status(str(path), "td.example", "node7")
    assert not other["loads"] and "node.name: is not a node of the registry" in other["detail"] and "(got 'node7')" in other["detail"]
    assert "registry.file" in readiness.registry_status(str(tmp_path / "nope.yaml"), "td.example", "node1")["detail"]
