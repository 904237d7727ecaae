"""Thin CLI verbs: parse options into a config, call one engine function, render with rich."""
