"""The running configuration, in three rooms with one direction of imports (tasks -> active -> snapshot).

* :mod:`sidecar.runtime.snapshot` - pure assembly: a loaded configuration plus the carried state
  (:class:`CarriedState`) in, a compiled :class:`Snapshot` out; buildable in memory.
* :mod:`sidecar.runtime.active` - the :class:`Runtime`: reload with a fingerprint short-circuit,
  atomic swap, ``decide``, JWKS.
* :mod:`sidecar.runtime.tasks` - the task API's service (:class:`TaskService`): accept, delegate
  with budget reservation, revoke, publish.

Below them, :mod:`sidecar.runtime.inputs` fingerprints what a build read (the reload short-circuit).
"""

from sidecar.runtime.active import Runtime
from sidecar.runtime.snapshot import CarriedState, Snapshot, build_snapshot
from sidecar.runtime.tasks import NotAuthorizedError, TaskService

__all__ = ["CarriedState", "NotAuthorizedError", "Runtime", "Snapshot", "TaskService", "build_snapshot"]
