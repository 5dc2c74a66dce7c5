"""engine-core: the scheduling busy loop, its sockets to frontends, and the executors that drive workers."""
