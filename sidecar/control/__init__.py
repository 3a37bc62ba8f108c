"""Continuous verification: the anomaly rule (quarantine), the freeze/unfreeze/kill ladder, human
approvals, and the signed documents that carry an operator's steps.

* :mod:`~sidecar.control.documents` - signed actions, approvals and operator tokens (JWS), verified
  against the root issuers and the trust bundles;
* :mod:`~sidecar.control.ladder` - which tasks the honoured actions freeze or kill;
* :mod:`~sidecar.control.quarantine` - counting out-of-task denials in a window;
* :mod:`~sidecar.control.approvals` - calls waiting for a human, and the single use of an approval.
"""

from sidecar.control.approvals import Approval, ApprovalBook, ApprovalState
from sidecar.control.documents import Action, ActionKind, ControlCode, ControlError, Target, TargetKind
from sidecar.control.ladder import Ladder
from sidecar.control.quarantine import AnomalyDetector, Strike, effective_rule

__all__ = [
    "Action",
    "ActionKind",
    "AnomalyDetector",
    "Approval",
    "ApprovalBook",
    "ApprovalState",
    "ControlCode",
    "ControlError",
    "Ladder",
    "Strike",
    "Target",
    "TargetKind",
    "effective_rule",
]
