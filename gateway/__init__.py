"""The gateway: one OpenAI-compatible URL in front of the replicas (see docs/gateway.md)."""
