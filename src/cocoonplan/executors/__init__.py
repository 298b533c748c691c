"""Executors carry out a saved plan's steps (apply). Apply is a later capability; nothing here yet."""
