"""What the traffic means: parsers for LLM APIs, MCP and server-sent events.

Pure code with no mitmproxy imports, so it can be tested on plain bytes and reused on both sides of the
proxy: the policy reads request facts from it (which model, which tools), and the proxy feeds it the answers
as they stream through (response observers) to record usage, tool calls and errors in the audit.
"""
