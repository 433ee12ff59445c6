"""Bastion: a sidecar proxy that puts AI agents under control.

Data flows one way: policy (rules) -> proxy (identity, enforcement, capture) -> coord (locks, approvals)
-> audit (records, sinks) -> dashboard (pages, API, metrics).
"""

__version__ = "0.1.0"
