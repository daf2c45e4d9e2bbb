"""Dispatch: how a fired job reaches a node (built-in HTTP or RocketMQ)."""
