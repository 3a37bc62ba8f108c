"""Decision records."""

from sidecar.audit.log import RECORD_FIELDS, DecisionLog, RecordField, decision_record

__all__ = ["RECORD_FIELDS", "DecisionLog", "RecordField", "decision_record"]
