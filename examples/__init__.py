"""User strategies for `strategies: [{kind: "examples.<module>:<Class>"}]` (sim/strategies.py)."""
