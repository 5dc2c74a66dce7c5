"""Model building blocks written for paged attention and tensor parallelism."""
