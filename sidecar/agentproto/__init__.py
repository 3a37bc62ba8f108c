"""Agent protocols as task rules: MCP (tools, arguments, resources, prompts, ``tools/list``) and A2A.

Modules, one concept each: :mod:`~sidecar.agentproto.jsonrpc` (the strict reader of one JSON-RPC
message), :mod:`~sidecar.agentproto.headers` (MCP 2026-07-28 ``Mcp-Method``/``Mcp-Name``),
:mod:`~sidecar.agentproto.names` (exact names and ``*`` globs), :mod:`~sidecar.agentproto.pointer`
(RFC 6901), :mod:`~sidecar.agentproto.spec` (the rule syntax), :mod:`~sidecar.agentproto.rules`
(compiled rules and the judgement), :mod:`~sidecar.agentproto.attenuation` (delegation narrows),
:mod:`~sidecar.agentproto.digest` (what records say about arguments) and
:mod:`~sidecar.agentproto.listfilter` (``tools/list`` responses filtered to what the task allows).

Nothing here knows about Envoy: the edge hands over headers and the buffered body.
"""
