"""The protocols: gRPC (KServe v2 `kserve`, our `classifier`, the call guard and status mapping in
`rpc`, TLS and tokens in `auth`) and HTTP (`rest`, `rest_codec`, `http`), and the one codec
between protobuf and arrays (`codec`). They parse, check and answer; the work goes to
`serving.engine`. The same servicers run in the model owner and in the front-end processes."""
