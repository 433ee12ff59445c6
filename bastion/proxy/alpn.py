"""Prefer HTTP/2 with agents that offer it.

mitmproxy picks the first protocol in the client's ALPN list when no upstream connection exists yet (our
lazy connection strategy), and some clients list `http/1.1` before `h2` (httpx with `http2=True` does). A
TLS server normally chooses, and servers prefer h2; Bastion does the same, so an agent that asks for HTTP/2
gets it (mitmproxy translates to HTTP/1.1 upstream where needed).
"""

from __future__ import annotations

from mitmproxy.proxy.layers import tls


class PreferHttp2:
    """mitmproxy addon; must come after `TlsConfig`, whose `tls_start_client` prepares the connection."""

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        conn = tls_start.ssl_conn
        if conn is None:
            return
        data = conn.get_app_data()
        if (isinstance(data, dict) and data.get("http2") and data.get("client_alpn") is None
                and data.get("server_alpn") is None and b"h2" in tls_start.context.client.alpn_offers):
            data["client_alpn"] = b"h2"
