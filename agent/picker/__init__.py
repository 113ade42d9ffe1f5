"""`modelshelf picker`: the Endpoint Picker of a fleet of agents behind an Envoy-based gateway.

One role per module: `extproc` (the protocol: read the model's name, answer the endpoint),
`placement` (the decision, pure), `agents` (the fleet's state from the agents' /fleet/state,
discovery), `messages` (the ext_proc messages), `service` (the process: gRPC server, health).
"""
