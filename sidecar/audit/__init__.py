"""Decision records."""

from sidecar.audit.log import DecisionLog, decision_record

__all__ = ["DecisionLog", "decision_record"]
