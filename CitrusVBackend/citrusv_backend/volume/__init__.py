"""Volumes: I/O with exact geometry, display orientation, windowing."""
