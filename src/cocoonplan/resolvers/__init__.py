"""Resolvers: all the I/O that turns specs into resolved, digest-pinned inputs for the planner."""
