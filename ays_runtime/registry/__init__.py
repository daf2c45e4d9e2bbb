"""The node registry: which executor nodes exist and which are healthy."""
