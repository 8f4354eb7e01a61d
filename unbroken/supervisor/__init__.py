"""Keep processes alive: restart what exits or stays unhealthy, with backoff; give up on a crash loop.

``policy.py`` decides (pure, time passed in), ``runner.py`` watches processes and acts on the
decisions, ``metrics.py`` counts, ``standalone.py`` is ``unbroken supervise --config FILE``.
``unbroken up`` runs the same :class:`~unbroken.supervisor.runner.Supervisor` over its replicas.
"""

from unbroken.supervisor.policy import Decision, ProgramPolicy, ProgramState, SupervisorSection

__all__ = ["Decision", "ProgramPolicy", "ProgramState", "SupervisorSection"]
