"""The scheduling center: timers, reconciliation, firing, the HTTP API."""
