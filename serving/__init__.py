"""The gRPC inference server: backends, dynamic batching, preprocessing, health and metrics.

Modules depend one way: the servicers (`kserve`, `classifier`) translate protobuf and call the
data plane (`service`), which feeds the `batcher`, which runs `backends`. Only the servicers and
`server` import gRPC.
"""
