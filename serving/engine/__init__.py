"""Where the models live: the data plane (`service`: routing, admission, accounting), the
dynamic `batcher`, the model instances and `backends`, the `repository` and model `control`,
`preprocess` (decoding into model inputs), shared-memory regions (`shm`), statistics and
tracing. Knows nothing of gRPC or HTTP."""
