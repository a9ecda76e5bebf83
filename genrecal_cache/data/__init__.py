"""Rows in: manifest sources, a row to a normalised sample, rendering a conversation to token ids and labels
(turn boundaries included), and the render workers. Shared with phase 2, which renders the student's side.
"""
