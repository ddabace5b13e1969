"""Toy Flower app (numpy only) for testing the local simulation runtime."""
