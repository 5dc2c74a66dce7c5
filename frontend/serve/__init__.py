"""`zllm serve`: the HTTP server in the frontend process (aiohttp on uvloop).

One module per concern: `server` (start, signals, graceful stop) and `cli` (its options);
`app` (routes and middlewares); `state` (what the server holds, and how every engine request
runs under it); `request_schemas` / `response_schemas` (OpenAI's and the native bodies as
msgspec Structs); `body` (reading and answering JSON); `params` (bodies as `SamplingParams` /
`PoolingParams` and prompts); the routes `completions`, `chat`, `embeddings`, `native`
(`/generate`, `/tokenize`, `/health`, `/metrics`, ...) and `websocket`; `streaming` (SSE,
NDJSON, merging streams), `gather` (a whole answer from deltas), `logprobs`, `errors`, and
`metrics` (Prometheus).
"""
