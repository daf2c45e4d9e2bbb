"""Every error Ays raises on purpose.

    AysError
    ├── ConfigError            an env file or rendered config is wrong (names file, field, fix)
    │   └── MissingSecretError a ${VAR} named in an env file is not set
    ├── ValidationError        a task/node/group field has a bad value (names field and value)
    │   ├── ScheduleError      a cron expression, @every rate or timezone is not understood
    │   └── InvalidDocument    several fields of a document (tasks as code) are bad: each listed
    ├── NotFoundError          a task, node, group or job log id does not exist
    ├── ConflictError          the change clashes with stored state (duplicate name, group in use)
    ├── StorageError           the database refused or could not be reached
    ├── RegistryError          the registry (Consul) refused a read or write
    │   └── TransientRegistryError   ... unreachable, timed out, 5xx or lost a CAS race:
    │                                trying again later may work
    ├── TransportError         a job could not be handed to a node
    │   └── TransientTransportError  ... but trying again later may work
    └── ServiceError           a service could not be installed, started, stopped or reloaded
        └── ReloadError        ... a reload's new process did not take over (the old serves on)

Library errors (SQLAlchemy, httpx, gRPC, Consul) are translated into these at the boundary
of the module that calls the library, with a message that names ids and values.
"""

from __future__ import annotations


class AysError(Exception):
    """Base of every error Ays raises on purpose."""


class ConfigError(AysError):
    """An env file or rendered config file is wrong; the message names file, field and fix."""


class MissingSecretError(ConfigError):
    """`${VAR}` placeholders name environment variables that are not set: every one of them
    is in the message, and their names in `names`."""

    def __init__(self, message: str, names: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.names = names


class ValidationError(AysError):
    """A field of a task, node or node group has a bad value."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        shown = repr(value)
        if len(shown) > 200:  # a 1 MB value is not echoed back whole
            shown = f"{shown[:160]}... ({len(shown)} characters)"
        super().__init__(f"{field}: {shown} is not valid: {expected}")


class ScheduleError(ValidationError):
    """A schedule expression or timezone cannot be understood."""


class InvalidDocument(ValidationError):
    """A document of several parts (tasks as code) has bad fields; `errors` lists every one
    found, each a ValidationError whose field is a path into the document (`tasks[2].schedule`).
    It reads as the first of them."""

    def __init__(self, errors: list[ValidationError]) -> None:
        first = errors[0]
        super().__init__(first.field, first.value, first.expected)
        self.errors = errors


class NotFoundError(AysError):
    """The object named by id does not exist."""


class ConflictError(AysError):
    """The change clashes with stored state."""


class StorageError(AysError):
    """The database refused the operation or could not be reached."""


class RegistryError(AysError):
    """The registry backend (Consul) refused a read or a write; the message names the key,
    service or address and what to fix (e.g. an ACL token without the needed policy)."""


class TransientRegistryError(RegistryError):
    """The registry could not be reached, timed out, failed on its side (5xx), or a
    check-and-set write kept losing to other writers: trying again later may work."""


class TransportError(AysError):
    """A job could not be handed to a node."""


class TransientTransportError(TransportError):
    """A dispatch failed in a way that may work when tried again (node busy, network blip)."""


class ServiceError(AysError):
    """Installing or running Ays as a service failed; the message names the path, pid or
    command and what to do."""


class ReloadError(ServiceError):
    """A reload's new process did not take over: it could not be run, exited, reported a
    failure or was not ready in time. The old process goes on serving."""
