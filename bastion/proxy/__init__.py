"""Everything that touches mitmproxy: the embedded proxy, its addons, the CA and `bastion run`.

Addons run in this order for every request (see `server.build_addons`): identity (who is calling),
enforce (facts -> policy decision), guard (where is it going, pinned to a vetted address), then the gate,
which refuses anything that still carries an unmet obligation. What the addons learn about a flow is kept in
`flow.metadata` under the keys in `bastion.proxy.flowmeta`, so later addons (locks, approvals, audit capture)
read the same decision the proxy enforced.
"""
