"""A small chat on replaylog: rooms, live messages over server-sent events, exact resume."""
