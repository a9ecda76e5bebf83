"""The teacher store: its format (the contract), the frozen teacher head, the writer with its atomic commits,
the reader and the integrity check. Shared with phase 2, which streams it.
"""
