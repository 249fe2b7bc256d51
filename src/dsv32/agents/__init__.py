"""Agents (issue 13): sandboxed tools, the agent loop, synthesized environments."""
