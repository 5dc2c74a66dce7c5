"""Worker processes: one per device, running the model with a paged KV cache and sampling on the device."""
