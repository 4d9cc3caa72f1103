"""gRPC glue: the only package of the library that imports grpc.

`server` builds servers with health, reflection, error mapping and tracing; `status` maps
`BitsmithError`s to status codes; `convert` maps wire messages to library types; `client` opens
channels with deadlines and tracing.
"""
