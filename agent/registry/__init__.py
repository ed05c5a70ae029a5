"""The registry: the agent's view of which workloads exist, where they run and who they are."""
