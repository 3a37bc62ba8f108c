"""Policy: compiled tasks and the decision function."""

from sidecar.policy.budget import BudgetLedger
from sidecar.policy.compile import compile_policy
from sidecar.policy.engine import decide_egress
from sidecar.policy.model import EgressRule, PolicyIndex, Task

__all__ = ["BudgetLedger", "EgressRule", "PolicyIndex", "Task", "compile_policy", "decide_egress"]
