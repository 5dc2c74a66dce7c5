"""The user's process: client library (AsyncLLM, LLM), tokenization, detokenization, CLI."""
