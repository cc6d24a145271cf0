"""HTTP API: dependencies (deps.py) and one router module per resource (routes/)."""
