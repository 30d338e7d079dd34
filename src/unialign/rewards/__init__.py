"""Explicit reward sources shared by online training, dataset building and evaluation."""
