"""Launchers that run fedlora through Flower's simulation runtime."""
