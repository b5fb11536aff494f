"""Runtime plumbing: Ray internals, consoles, node paths, the C allocator."""
