"""The agent's control plane at run time: the workload controller (registry changes → capture and
identities) and the admin socket through which operators and integrations add or remove workloads."""
