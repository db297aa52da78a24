"""stratos-agent: runs on each GPU host, reports telemetry and runs pipeline steps in children."""
