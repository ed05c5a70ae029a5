"""``tcpmesh demo`` (``run``) and the tiny applications that play the workloads in it and in the
end-to-end tests (``sampleapps``, run as ``python -m agent.demo.sampleapps`` inside lab pods).

Sits on top of the lab; nothing of the agent imports it.
"""
