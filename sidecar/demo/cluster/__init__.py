"""``agent-authz demo --scenario cluster``: the quarterly-report workflow across pods of a simulated cluster."""
