"""The admin listener: health, readiness, Prometheus metrics, the JSON API and (later) the dashboard pages.

`create_app(policy_source)` builds the aiohttp application; `bastion serve` runs it on the proxy's event loop.
"""
