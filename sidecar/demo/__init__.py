"""The quarterly-report demo: sample upstream, sample agent, scenario and runner."""
