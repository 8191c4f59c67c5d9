"""The gRPC API: `.proto` sources and the Python code generated from them (`make proto`)."""

# ClassifyRequest.top_k 0 means this many classes: the server fills it in and the clients send it.
DEFAULT_TOP_K = 5
