"""`zllm bench`: latency, throughput and profile of the engine, with transformers as the peer."""
